"""The guardian: kills every process of a supervisor's rank trees once the supervisor is gone.

The parent-death signal kills each rank when the supervisor dies, but not the rank's own
children (vLLM's engine processes, which hold the GPU memory). So each run starts one small
guardian (`_guardian_process`) in a session of its own, reading a pipe whose only writer is
the supervisor. When the pipe closes — the supervisor closed it after its ranks were stopped,
or the kernel closed it because the supervisor died, even by SIGKILL — the guardian SIGKILLs
every process that carries the run's tree cookie, and exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ._cookie import TREE_ENV, guardian_cookie

__all__ = ["open_guardian"]

#: After the supervisor closes the pipe, how long to wait for the guardian's last scan.
_EXIT_TIMEOUT = 2.0


@asynccontextmanager
async def open_guardian(run_id: str) -> AsyncIterator[None]:
    """Keep a guardian for run `run_id` running for the duration of the block.

    **Cancellation**: the exit is shielded and bounded: it closes the pipe, then waits up to
    a couple of seconds for the guardian's last scan.
    """
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_dpsup._guardian_process", run_id],
        stdin=subprocess.PIPE,
        # Its own session: a signal to the supervisor's process group must not reach it.
        start_new_session=True,
        # Marked as part of the run, so that anyone listing the run's processes sees it.
        env={**os.environ, TREE_ENV: guardian_cookie(run_id)},
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
