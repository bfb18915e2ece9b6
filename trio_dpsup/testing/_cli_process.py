"""The CLI supervisor as a subprocess, for tests that run it as a user would: `CLI` is the
one command line that starts it, `open_cli_supervisor` runs it for a block, `run_cli` to its
end (bad input, ``--help``, ``ctl``).

Waits take no timeouts: bound them with ``trio.fail_after``, as any Trio call. A wait
called with no deadline at all is bounded by `WAIT_TIMEOUT` instead, so a forgotten bound
fails, naming what it waited for, and never hangs a test run.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import httpx
import trio

from .._state.document import status_from_json
from .._state.status import SupervisorStatus

__all__ = [
    "CLI",
    "WAIT_TIMEOUT",
    "CliResult",
    "CliSupervisor",
    "default_bound",
    "open_cli_supervisor",
    "run_cli",
]

#: How tests start the CLI: this Python, and never the working directory on its path (-P).
CLI = (sys.executable, "-P", "-m", "trio_dpsup")

#: The bound, in seconds, of a wait whose caller set no deadline.
WAIT_TIMEOUT = 120.0


def default_bound() -> contextlib.AbstractContextManager[object]:
    """``fail_after(WAIT_TIMEOUT)`` where the caller set no deadline; else nothing: the
    caller's own bound applies, however long."""
    if math.isinf(trio.current_effective_deadline()):
        return trio.fail_after(WAIT_TIMEOUT)
    return contextlib.nullcontext()


#: After the supervisor exits, how long its stderr may stay open (held by a leftover rank).
_EOF_TIMEOUT = 5.0
_CONTROL_URL = re.compile(r"control plane listening on ([^\s\"]+)")  # text or JSON


class CliSupervisor:
    """A running ``python -m trio_dpsup`` process and what it has logged so far."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        #: Every line the supervisor wrote to stderr, as it arrives.
        self.lines: list[str] = []
        self._new_line = trio.Event()
        self._eof = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    async def wait_for_line(self, pattern: str, *, after: int = 0) -> re.Match[str]:
        """Wait for a log line matching the regex `pattern`, among the lines from index
        `after` on (``after=len(sup.lines)``: a line still to come)."""
        regex = re.compile(pattern)
        seen = after
        with default_bound():
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                if self._eof:
                    raise AssertionError(f"supervisor exited without logging {pattern!r}")
                await self._new_line.wait()

    async def control_url(self) -> str:
        """The control plane's URL, from the supervisor's log."""
        return (await self.wait_for_line(_CONTROL_URL.pattern)).group(1)

    async def wait_ready(self) -> str:
        """Wait until every rank is ready; return the control plane's URL."""
        url = await self.control_url()
        await self.wait_for_line(r"all \d+ ranks are ready")
        return url

    async def status(self) -> SupervisorStatus:
        """GET /status, as the library's typed status."""
        return status_from_json(await self.status_document())

    async def status_document(self) -> dict[str, Any]:
        """GET /status as JSON, for tests of the document itself."""
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"{await self.control_url()}/status")
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result

    async def wait_for_eof(self) -> None:
        """Wait until every writer of the supervisor's stderr (ranks included) is gone."""
        while not self._eof:
            await self._new_line.wait()

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait(self) -> int:
        """Wait for the supervisor to exit; return its exit status."""
        with default_bound():
            return await self.process.wait()

    async def _pump(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            if complete:
                self.lines.extend(line.decode(errors="replace") for line in complete)
                self._wake()
        if buffer:
            self.lines.append(buffer.decode(errors="replace"))
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        self._new_line.set()
        self._new_line = trio.Event()


class CliResult(NamedTuple):
    """How a CLI run that `run_cli` waited for ended, and what it printed: decoded as UTF-8,
    where a byte that is not UTF-8 stands as a lone surrogate; `stdout_bytes` and
    `stderr_bytes` give back exactly the bytes written."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def stdout_bytes(self) -> bytes:
        return self.stdout.encode(errors="surrogateescape")

    @property
    def stderr_bytes(self) -> bytes:
        return self.stderr.encode(errors="surrogateescape")


async def run_cli(
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    prefix: Sequence[str] = (),
    cwd: str | None = None,
) -> CliResult:
    """Run ``CLI ARGS`` (after `prefix`, a wrapper such as ``prlimit ... --``) to its end,
    with no input; bounded by `WAIT_TIMEOUT` where the caller set no deadline."""
    with default_bound():
        result = await trio.run_process(
            [*prefix, *CLI, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
            cwd=cwd,
        )
    out, err = (data.decode(errors="surrogateescape") for data in (result.stdout, result.stderr))
    return CliResult(result.returncode, out, err)


@asynccontextmanager
async def open_cli_supervisor(
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    prefix: Sequence[str] = (),
    program: Sequence[str] | None = None,
    cwd: str | None = None,
) -> AsyncIterator[CliSupervisor]:
    """Run ``CLI ARGS`` (after `prefix`, a wrapper; or `program` ARGS, such as the console
    script) for the duration of the block.

    On the way out a supervisor still running is sent SIGKILL (its ranks then die with it,
    by their parent-death signal) and reaped.
    """
    process = await trio.lowlevel.open_process(
        [*prefix, *(program or CLI), *args],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=None if env is None else dict(env),
        cwd=cwd,
    )
    assert process.stderr is not None
    supervisor = CliSupervisor(process)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor._pump, process.stderr)
        try:
            yield supervisor
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.send_signal(signal.SIGKILL)
                await process.wait()
                # Ranks inherit the pipe; one that outlived the supervisor would hold it open.
                with trio.move_on_after(_EOF_TIMEOUT):
                    await supervisor.wait_for_eof()
            nursery.cancel_scope.cancel()
