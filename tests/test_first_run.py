"""A first test run says what it does: the engine of the engine tiers is found or built
before the first test, with a line saying what, why, how long and how to avoid it, never
inside a test (whose faulthandler timeout would dump threads mid-build); a run that selects
no engine test builds nothing and says nothing of it. The README's test section says the
same, and names the command that writes the tiny model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import BUILD_TIME, NO_BUILD_ENV
from trio_dpsup.testing.llama_cpp import SERVER_ENV

ROOT = Path(__file__).parent.parent


def pytest_run(*args: str, cache: Path, **env: str) -> str:
    """A pytest run of this suite, on a machine whose engine cache is `cache`."""
    environ = {k: v for k, v in os.environ.items() if k not in (NO_BUILD_ENV, SERVER_ENV)}
    environ |= {"XDG_CACHE_HOME": str(cache), **env}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", *args],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_engine_line_comes_before_the_first_engine_test(tmp_path: Path) -> None:
    out = pytest_run("tests/test_llama_cpp.py", cache=tmp_path, **{NO_BUILD_ENV: "1"})
    lines = out.splitlines()
    (engine,) = [i for i, line in enumerate(lines) if line.startswith("engine: ")]
    first_test = next(i for i, line in enumerate(lines) if line.startswith("tests/test_llama"))
    assert engine < first_test, out
    said = re.search(
        rf"(\d+) tests will skip: llama-server is not built here and {NO_BUILD_ENV}", out
    )
    assert said is not None, out
    assert f" {said[1]} skipped" in out  # every engine test of the file, as announced


def test_a_build_is_announced_with_its_time_and_its_ways_out(tmp_path: Path) -> None:
    # No cmake on this PATH: the build is announced, then fails at once, and the tests skip.
    bare = tmp_path / "bin"
    bare.mkdir()
    out = pytest_run("tests/test_llama_cpp.py", cache=tmp_path, PATH=str(bare))
    announced = next(line for line in out.splitlines() if line.startswith("engine: building"))
    for said in (BUILD_TIME, "once per machine", f"{NO_BUILD_ENV}=1", SERVER_ENV, str(tmp_path)):
        assert said in announced, announced
    skip = re.search(r"engine: none, (\d+) tests will skip: llama-server: no cmake", out)
    assert skip is not None, out
    assert f" {skip[1]} skipped" in out


def test_collecting_only_builds_nothing(tmp_path: Path) -> None:
    out = pytest_run("tests/test_llama_cpp.py", "--collect-only", "-q", cache=tmp_path)
    assert "engine: " not in out
    assert not (tmp_path / "trio-dpsup").exists()


def test_a_run_without_engine_tests_says_nothing_of_an_engine(tmp_path: Path) -> None:
    out = pytest_run("tests/test_examples.py", "-k", "reset", cache=tmp_path)
    assert "engine: " not in out
    assert not (tmp_path / "trio-dpsup").exists()


def test_the_readme_says_how_the_first_run_goes() -> None:
    text = (ROOT / "README.md").read_text()
    for said in (NO_BUILD_ENV, SERVER_ENV, "cmake", "13 minutes", "--model"):
        assert said in text, said
