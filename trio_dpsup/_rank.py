"""The task that owns one rank's process: spawn it, await its exit, stop it.

An exit that nobody asked for is a failure (`RankExited`), also with status 0. Cancellation
of the task is the request to stop: it runs the stop procedure, shielded and bounded by the
shared grace deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import psutil
import trio

from ._cookie import TREE_ENV
from ._errors import RankExited, RankSpawnFailed, SupervisorFailure, describe_returncode
from ._logs import LogPump, wait_drained
from ._process_tree import TreeScanner
from ._spawn import Spawner
from ._state import RankRecord, RankState
from ._stop import StopClock, stop_rank

__all__ = ["run_rank"]

logger = logging.getLogger(__name__)


async def run_rank(
    record: RankRecord,
    *,
    spawner: Spawner,
    scanner: TreeScanner,
    clock: StopClock,
    environ: Mapping[str, str],
    cookie: str,
    fail: Callable[[SupervisorFailure], SupervisorFailure],
    pump: LogPump | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one rank until it exits or this task is cancelled.

    Calls ``task_status.started()`` once the process exists. `fail` records a failure and
    cancels the other ranks at once, before this rank's own leftovers are cleaned up. With a
    `pump`, the rank's output is relayed, and this returns once its last line is out.

    **Cancellation**: stops the rank (signal, grace, tree kill) before returning; that part
    is shielded and bounded by the shared grace deadline plus the kill timeout.
    """
    plan = record.plan
    env = {**environ, **dict(plan.env), TREE_ENV: cookie}
    try:
        process = await spawner.spawn(plan.argv, env, capture=pump is not None)
    except OSError as exc:
        record.state = RankState.FAILED
        raise fail(RankSpawnFailed(plan.rank, str(exc))) from exc
    # The tree scan skips processes older than the rank. psutil's clock, not time.time():
    # create_time rests on the integer boot time and can read up to a second early.
    scanner.register(cookie, process.pid, psutil.Process(process.pid).create_time())
    record.pid = process.pid
    if pump is not None and process.output is not None:
        pump.attach(plan.rank, *process.output, record.output)
    record.state = RankState.STARTING
    rank = {"rank": plan.rank}
    logger.info("rank %d started: pid %d, port %d", plan.rank, process.pid, plan.port, extra=rank)
    task_status.started()

    failure: SupervisorFailure | None = None
    try:
        returncode = await process.wait()
        record.returncode = returncode
        record.state = RankState.FAILED
        how = describe_returncode(returncode)
        logger.error("rank %d exited unexpectedly: %s", plan.rank, how, extra=rank)
        failure = fail(RankExited(plan.rank, returncode))
    finally:
        with trio.CancelScope(shield=True):
            if record.state is not RankState.FAILED:
                record.state = RankState.STOPPING
            graceful = await stop_rank(plan.rank, process, cookie, scanner, clock)
            if process.output is not None:
                await wait_drained(record.output)  # its last lines, before the report
            record.killed = not graceful
            record.returncode = process.returncode
            if record.state is RankState.STOPPING:
                record.state = RankState.STOPPED
                logger.info(
                    "rank %d stopped: %s",
                    plan.rank,
                    describe_returncode(process.returncode)
                    if process.returncode is not None
                    else "still running",
                    extra=rank,
                )
    raise failure
