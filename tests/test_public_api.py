"""The public surface: what `__all__` promises, and the README's library example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import trio

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
    assert f"```python\n{example}```" in (ROOT / "README.md").read_text()


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
    assert f"```python\n{example}```" in (ROOT / "README.md").read_text()


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
