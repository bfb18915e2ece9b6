"""The guardian: kills every process of a supervisor's rank trees once the supervisor is gone.

The parent-death signal kills each rank when the supervisor dies, but not the rank's own
children (vLLM's engine processes, which hold the GPU memory). So each run starts one small
guardian (`guardian_process`) in a session of its own, reading a pipe whose only writer is
the supervisor. Through it the supervisor streams what it knows of the trees (each rank's
process, the members its tree watch has seen, the ranks' cgroups). When the pipe closes —
the supervisor closed it after its ranks were stopped, or the kernel closed it because the
supervisor died, even by SIGKILL — the guardian kills every member of the run's trees, as
`_membership` defines them, and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from .cookie import TREE_ENV, guardian_cookie
from .membership import Root

__all__ = ["Guardian", "open_guardian"]

logger = logging.getLogger(__name__)

#: After the supervisor closes the pipe, how long to wait for the guardian's last sweep.
_EXIT_TIMEOUT = 5.0
#: Where the package lives: the guardian's only path entry besides the standard library's.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
#: Run in isolated mode (-I: no working directory, PYTHON* variables or user site on the
#: path), with the folder that holds this very package put first.
_PROGRAM = (
    f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); "
    "from trio_dpsup._proc.guardian_process import main; main()"
)


class Guardian:
    """The supervisor's end of the pipe: what it tells the guardian about the trees.

    Lines are queued and written by a task of their own; the guardian reads them as they
    come, so the queue stays short.
    """

    def __init__(self, pid: int, send: trio.MemorySendChannel[bytes]) -> None:
        #: The guardian's pid: never a member of any tree.
        self.pid = pid
        self._send = send

    def root(self, root: Root) -> None:
        self._tell(f"root {root.rank} {root.pid} {root.start}\n".encode())

    def seen(self, rank: int, pid: int, start: int) -> None:
        self._tell(f"seen {rank} {pid} {start}\n".encode())

    def cgroup(self, path: str) -> None:
        self._tell(b"cgroup " + os.fsencode(path) + b"\n")

    def _tell(self, line: bytes) -> None:
        # The guardian is gone or closing: nothing left to tell it.
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self._send.send_nowait(line)


@asynccontextmanager
async def open_guardian(run_id: str) -> AsyncIterator[Guardian]:
    """Keep a guardian for run `run_id` running for the duration of the block.

    **Cancellation**: the exit is shielded and bounded: it closes the pipe, then waits up to
    a few seconds for the guardian's last sweep.
    """
    process = await trio.lowlevel.open_process(
        [sys.executable, "-I", "-c", _PROGRAM, run_id],
        stdin=subprocess.PIPE,
        # Its own session: a signal to the supervisor's process group must not reach it.
        start_new_session=True,
        # Marked as part of the run, so that anyone listing the run's processes sees it.
        env={**os.environ, TREE_ENV: guardian_cookie(run_id)},
        cwd="/",
    )
    assert process.stdin is not None
    stdin = process.stdin
    send, receive = trio.open_memory_channel[bytes](float("inf"))

    async def forward() -> None:
        async with receive:
            async for line in receive:
                try:
                    await stdin.send_all(line)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    logger.error("the guardian (pid %d) is gone: %s", process.pid, line)
                    return

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward)
            try:
                yield Guardian(process.pid, send)
            finally:
                send.close()  # forward() writes what is queued, then ends
    finally:
        with trio.CancelScope(shield=True):
            await stdin.aclose()
            with trio.move_on_after(_EXIT_TIMEOUT):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
