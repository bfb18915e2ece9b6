"""The public surface: what `__all__` promises, and the library example of docs/library.md."""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import trio
from typing_extensions import Unpack

import trio_dpsup
import trio_dpsup.testing
from trio_dpsup.testing import free_port_range

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("package", [trio_dpsup, trio_dpsup.testing])
def test_all_lists_exactly_the_public_names(package: ModuleType) -> None:
    public = {
        name
        for name in dir(package)
        if not name.startswith("_") and not isinstance(getattr(package, name), ModuleType)
    }
    assert set(package.__all__) == public


def test_a_rank_imports_none_of_the_supervisor() -> None:
    """Ranks run `python -m trio_dpsup.demo`: the packages above it must load lazily."""
    code = (
        "import sys, trio_dpsup.testing.fake_rank\n"
        "heavy = {'trio', 'httpx', 'hypercorn', 'psutil'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_shows_the_example_verbatim() -> None:
    example = (ROOT / "examples" / "embed.py").read_text()
    assert f"```python\n{example}```" in (ROOT / "docs" / "library.md").read_text()


async def test_readme_example_runs() -> None:
    base = free_port_range(2)
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, str(ROOT / "examples" / "embed.py"), str(base)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "rank 0 (pid" in out
    assert "rank 1 (pid" in out


def test_readme_shows_the_testing_example_verbatim() -> None:
    example = (ROOT / "examples" / "test_my_deployment.py").read_text()
    assert f"```python\n{example}```" in (ROOT / "docs" / "library.md").read_text()


async def test_testing_example_passes_in_a_project_of_its_own(tmp_path: Path) -> None:
    """Copied out of this repository (no pytest configuration, no trio_mode), as a user would."""
    test_file = tmp_path / "test_my_deployment.py"
    test_file.write_text((ROOT / "examples" / "test_my_deployment.py").read_text())
    with trio.fail_after(120):
        result = await trio.run_process(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
            cwd=tmp_path,
            capture_stdout=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, out
    assert "2 passed" in out


def _types_in(hint: object) -> Iterator[type]:
    """Every class a type hint mentions, through unions and generics."""
    if isinstance(hint, type) and not typing.get_args(hint):
        yield hint
    for arg in typing.get_args(hint):
        yield from _types_in(arg)
    origin = typing.get_origin(hint)
    if isinstance(origin, type):
        yield origin


def _hints(obj: object, names: dict[str, object]) -> list[object]:
    # Unpack: the harness's typed **settings name it for type checkers only.
    try:
        return list(typing.get_type_hints(obj, localns={**names, "Unpack": Unpack}).values())
    except TypeError:
        return []  # not something with annotations (a constant, a builtin)


def _public_hints(value: object, names: dict[str, object]) -> Iterator[tuple[str, object]]:
    """(where, hint) for each annotation a user of `value` meets."""
    if inspect.isclass(value):
        for hint in _hints(value, names):  # fields and class attributes
            yield value.__qualname__, hint
        for attr, member in vars(value).items():
            if attr.startswith("_") and attr != "__init__":
                continue
            if isinstance(member, property):
                member = member.fget
            if callable(member) or isinstance(member, classmethod | staticmethod):
                function = getattr(member, "__func__", member)
                for hint in _hints(function, names):
                    yield f"{value.__qualname__}.{attr}", hint
    elif callable(value):
        for hint in _hints(value, names):
            yield getattr(value, "__qualname__", repr(value)), hint


def test_every_type_in_a_public_signature_is_exported() -> None:
    """A user who holds a value of the public API can name its type."""
    exported = {name: getattr(trio_dpsup, name) for name in trio_dpsup.__all__}
    exported |= {name: getattr(trio_dpsup.testing, name) for name in trio_dpsup.testing.__all__}
    reachable = set(map(id, exported.values()))
    missing = set()
    for value in exported.values():
        for where, hint in _public_hints(value, exported):
            for cls in _types_in(hint):
                # A private class (the handle's run) is one a user never holds or builds.
                private = cls.__name__.startswith("_")
                ours = cls.__module__.startswith("trio_dpsup")
                if ours and not private and id(cls) not in reachable:
                    missing.add(f"{cls.__qualname__} (in {where})")
    assert not missing, f"not exported: {sorted(missing)}"
