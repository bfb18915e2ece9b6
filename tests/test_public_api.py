"""The public surface: what `__all__` promises, and the library example of docs/library.md."""

from __future__ import annotations

import ast
import compileall
import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import typing
import zipfile
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
PACKAGE = ROOT / "trio_dpsup"


@pytest.mark.parametrize("package", [trio_dpsup, trio_dpsup.testing])
def test_all_lists_exactly_the_public_names(package: ModuleType) -> None:
    public = {
        name
        for name in dir(package)
        if not name.startswith("_") and not isinstance(getattr(package, name), ModuleType)
    }
    assert set(package.__all__) == public


@pytest.mark.parametrize("rank", ["trio_dpsup.demo", "trio_dpsup.testing.fake_rank"])
def test_a_rank_imports_none_of_the_supervisor(rank: str) -> None:
    """Ranks run `python -m trio_dpsup.demo` (or the fake rank): the packages above them
    must load lazily (see trio_dpsup/_lazy.py for what eager imports cost)."""
    code = (
        f"import sys, {rank}\n"
        "heavy = {'trio', 'httpx', 'h11', 'hypercorn', 'psutil'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def _lazy_packages() -> list[str]:
    """The packages that export their names through `_lazy`, found in the source."""
    return sorted(
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in PACKAGE.rglob("__init__.py")
        if "lazy_exports(" in path.read_text()
    )


def _type_checkers_exports(path: Path) -> dict[str, str]:
    """Public name -> relative module, as the ``if typing.TYPE_CHECKING:`` block of `path`
    imports it (``from ._errors import ConfigError as ConfigError``)."""
    found: dict[str, str] = {}
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "typing.TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom), ast.unparse(statement)
                module = "." * statement.level + (statement.module or "")
                for alias in statement.names:
                    # `X as X`: the form that re-exports X to type checkers (mypy --strict).
                    assert alias.asname == alias.name, ast.unparse(statement)
                    found[alias.name] = module
    return found


def test_every_lazy_package_is_checked() -> None:
    assert _lazy_packages() == ["trio_dpsup", "trio_dpsup.testing"]


@pytest.mark.parametrize("name", _lazy_packages())
def test_the_export_table_is_what_type_checkers_read(name: str) -> None:
    """The run time's table (`_EXPORTS`) and the type checkers' imports name the same
    names from the same modules: neither form can gain or lose a name alone."""
    package = importlib.import_module(name)
    assert package.__file__ is not None
    declared = _type_checkers_exports(Path(package.__file__))
    assert declared, f"{name} declares no exports for type checkers"
    assert declared == package._EXPORTS


def _import_everything(pythonpath: Path, where: Path) -> dict[str, list[str]]:
    """Import both packages from `pythonpath` in a fresh interpreter, look up every public
    name, and return their `__all__`; the package must come from `where`."""
    code = (
        "import json, sys, trio_dpsup, trio_dpsup.testing\n"
        "assert trio_dpsup.__file__.startswith(sys.argv[1]), trio_dpsup.__file__\n"
        "trio_dpsup.SupervisorConfig, trio_dpsup.testing.Harness\n"
        "packages = (trio_dpsup, trio_dpsup.testing)\n"
        "for package in packages:\n"
        "    for name in package.__all__:\n"
        "        getattr(package, name)\n"
        "print(json.dumps({p.__name__: sorted(p.__all__) for p in packages}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", code, str(where)],
        env={**os.environ, "PYTHONPATH": str(pythonpath)},
        cwd=pythonpath.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found: dict[str, list[str]] = json.loads(result.stdout)
    return found


EXPECTED_ALL = {
    "trio_dpsup": sorted(trio_dpsup.__all__),
    "trio_dpsup.testing": sorted(trio_dpsup.testing.__all__),
}


def test_the_package_imports_without_its_sources(tmp_path: Path) -> None:
    """Compiled with `compileall -b` and the .py files removed, as slim images install it."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "trio_dpsup", ignore=shutil.ignore_patterns("__pycache__"))
    assert compileall.compile_dir(site, legacy=True, quiet=1)
    for source in site.rglob("*.py"):
        source.unlink()
    assert not list(site.rglob("*.py"))
    assert _import_everything(site, site / "trio_dpsup") == EXPECTED_ALL


def test_the_package_imports_from_a_zip(tmp_path: Path) -> None:
    archive = tmp_path / "trio_dpsup.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(PACKAGE.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                zipped.write(path, path.relative_to(ROOT).as_posix())
    assert _import_everything(archive, archive / "trio_dpsup") == EXPECTED_ALL


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
