"""The guardian: kills every process of a supervisor's rank trees once the supervisor is gone.

The parent-death signal kills each rank when the supervisor dies, but not the rank's own
children (vLLM's engine processes, which hold the GPU memory). So each run starts one small
guardian in a session of its own, reading a pipe whose only writer is the supervisor. When
the pipe closes — the supervisor closed it after its ranks were stopped, or the kernel closed
it because the supervisor died, even by SIGKILL — the guardian SIGKILLs every process that
carries the run's tree cookie, and exits.

The guardian itself imports only the standard library and reads /proc directly, so it
costs a few megabytes and starts in milliseconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ._process_tree import TREE_ENV

__all__ = ["kill_marked", "open_guardian"]

#: Passes over /proc: a process forked while a pass runs is caught by the next one.
_MAX_PASSES = 5
#: After the supervisor closes the pipe, how long to wait for the guardian's last scan.
_EXIT_TIMEOUT = 2.0


def kill_marked(run_cookie: str) -> int:
    """SIGKILL every process whose tree cookie belongs to `run_cookie`; return how many."""
    needle = f"{TREE_ENV}={run_cookie}:".encode()
    killed = 0
    for _ in range(_MAX_PASSES):
        found = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read()
                if any(var.startswith(needle) for var in environ.split(b"\0")):
                    os.kill(int(entry), signal.SIGKILL)
                    found += 1
            except OSError:
                continue  # gone, or not ours to read
        killed += found
        if not found:
            break
    return killed


@asynccontextmanager
async def open_guardian(run_cookie: str) -> AsyncIterator[None]:
    """Keep a guardian for `run_cookie` running for the duration of the block.

    **Cancellation**: the exit is shielded and bounded: it closes the pipe, then waits up to
    a couple of seconds for the guardian's last scan.
    """
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_dpsup._guardian", run_cookie],
        stdin=subprocess.PIPE,
        # Its own session: a signal to the supervisor's process group must not reach it.
        start_new_session=True,
    )
    assert process.stdin is not None
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            await process.stdin.aclose()
            with trio.move_on_after(_EXIT_TIMEOUT):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


def main() -> None:
    # Signals meant for the supervisor's terminal or group must not end the guardian early.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run_cookie = sys.argv[1]
    sys.stdin.buffer.read()  # returns at EOF: the supervisor is done, or dead
    kill_marked(run_cookie)


if __name__ == "__main__":
    main()
