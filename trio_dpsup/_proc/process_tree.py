"""Finding, killing and reaping every process a rank left behind.

Who belongs to a rank's tree is `_membership`'s answer (session and group, tree cookie,
the registry of members seen before, parent links, adopted orphans, cgroups): the same
answer the guardian, the placement check and the leftover report use.

Waiting uses pidfds, which become readable when a process exits, whoever its parent is: no
polling. Psutil's `Process` objects guard every signal against pid reuse.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable
from functools import partial

import psutil
import trio

from .membership import ProcStat, Trees, read_stat
from .spawn import Spawner

__all__ = [
    "TreeScanner",
    "kill_all",
    "process_of",
    "reap",
    "run_tree_watch",
    "signal_all",
    "wait_gone",
]

logger = logging.getLogger(__name__)


class TreeScanner:
    """Coalesces tree scans: every rank that asks while a scan runs shares its result.

    When all ranks stop at once, one pass over the process table serves them all, instead
    of one pass per rank competing for the interpreter while the control plane must answer.
    """

    def __init__(self, trees: Trees) -> None:
        self.trees = trees
        self._pending: trio.Event | None = None
        self._result: dict[int, list[psutil.Process]] = {}

    async def scan(self, rank: int, *, fresh: bool = False) -> list[psutil.Process]:
        """The live tree of rank `rank`, its rank processes excluded.

        With `fresh`, the result comes from a scan that began after this call: nothing forked
        before the call can be missing from it.

        **Cancellation**: safe; a scan already running in its thread finishes unobserved.
        """
        if fresh and self._pending is not None:
            await self._pending.wait()  # it began before us; the next one will not have
        if self._pending is None:
            self._pending = done = trio.Event()
            try:
                self._result = await trio.to_thread.run_sync(self._scan)
            finally:
                self._pending = None
                done.set()
        else:
            await self._pending.wait()
        return self._result.get(rank, [])

    async def kill_members(self, ranks: Iterable[int] | None, *, scan: bool = True) -> int:
        """SIGKILL, in passes, every member of `ranks` (None: of the whole run) still alive;
        without `scan`, only the orphans we adopted (see `Trees.kill_members`).

        **Cancellation**: safe; a pass already running in its thread finishes unobserved.
        """
        wanted = None if ranks is None else list(ranks)
        kill = partial(self.trees.kill_members, wanted, scan=scan)
        return await trio.to_thread.run_sync(kill)

    def _scan(self) -> dict[int, list[psutil.Process]]:
        roots = {root.pid for root in self.trees.roots}
        trees: dict[int, list[psutil.Process]] = {}
        for pid, (stat, rank) in self.trees.scan().items():
            if pid not in roots and (proc := process_of(stat)) is not None:
                trees.setdefault(rank, []).append(proc)
        return trees


def process_of(stat: ProcStat) -> psutil.Process | None:
    """A psutil handle on the process `stat` describes, or None if its pid moved on."""
    try:
        proc = psutil.Process(stat.pid)
    except psutil.NoSuchProcess:
        return None
    again = read_stat(stat.pid)  # after the handle: the same start means the same process
    return proc if again is not None and again.start == stat.start else None


def signal_all(procs: Iterable[psutil.Process], signum: int) -> None:
    """Send `signum` to each process that is still the one we saw (never to a reused pid)."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(signum)


async def wait_gone(procs: Iterable[psutil.Process]) -> None:
    """Return once every process in `procs` has exited.

    **Cancellation**: safe; bound it with a cancel scope. Nothing is reaped here.
    """
    async with trio.open_nursery() as nursery:
        for proc in procs:
            nursery.start_soon(_wait_one, proc)


# The timeout is part of the result (who survived it), not a cancel bound.
async def kill_all(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:  # noqa: ASYNC109
    """SIGKILL each process, wait up to `timeout` for them all, return those still alive.

    A process in uninterruptible sleep can outlive SIGKILL; the caller logs it by pid rather
    than waiting forever.

    **Cancellation**: safe; the caller normally shields this.
    """
    signal_all(procs, signal.SIGKILL)
    with trio.move_on_after(timeout):
        await wait_gone(procs)
    return [proc for proc in procs if _alive(proc)]


def reap(procs: Iterable[psutil.Process]) -> None:
    """Reap those of `procs` that are our exited children (orphans we adopted as subreaper).

    Only pids of the rank's tree are passed here, never a rank's own pid (its `RankProcess`
    reaps it) and never an unrelated child of the program embedding us.
    """
    for proc in procs:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, os.WNOHANG)


async def _wait_one(proc: psutil.Process) -> None:
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return
    try:
        # The pid may have been reused between the snapshot and pidfd_open.
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            return
        await trio.lowlevel.wait_readable(pidfd)
    except psutil.NoSuchProcess:
        return
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


#: One tree-watch round in this many reads every thread's children (see Trees.walk).
EVERY_THREAD_ROUNDS = 10


async def run_tree_watch(
    trees: Trees,
    tell: Callable[[int, int, int], None],
    spawner: Spawner,
    tick: Callable[[], Awaitable[object]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """At once and then each time `tick` returns (every ``--tree-watch-interval``: on the
    probes' ticks where it is a whole multiple of theirs, see _ranks.prober.Ticker): walk
    the rank trees by children links and `tell` (rank, pid, start) of each member not
    seen before (the guardian's registry); where we are a child subreaper, reap the
    orphans we adopted that have exited.

    A walk reads only the trees' own /proc entries (a fraction of a millisecond for a
    node's ranks), so it runs on the event loop. It asks each member's main thread for its
    children every round, and every thread one round in EVERY_THREAD_ROUNDS (the first
    included): a child forked by another thread is recorded within that many rounds.

    **Cancellation**: prompt; nothing is left half done.
    """
    task_status.started()
    rounds = 0
    try:
        while True:
            # One listing of our orphans serves the walk and the reaping. Reaping waits
            # for a round in which no rank is being started (see Spawner.lock); the walk
            # does not.
            locked = trees.adopter is not None and spawner.lock.acquire(blocking=False)
            try:
                orphans = trees.orphans(spawner.own) if locked else None
                new = trees.walk(orphans, every_thread=rounds % EVERY_THREAD_ROUNDS == 0)
                reaped = trees.reap(orphans) if orphans else []
            finally:
                if locked:
                    spawner.lock.release()
            for pid, start, rank in new:
                tell(rank, pid, start)
                logger.debug(
                    "rank %d: tree member pid %d recorded", rank, pid, extra={"rank": rank}
                )
            if reaped:
                logger.debug("reaped adopted orphans %s", reaped)
            rounds += 1
            if rounds % EVERY_THREAD_ROUNDS == 0:
                trees.prune()  # restarts must not pile up records that every round reads
            await tick()
    finally:
        trees.close()  # the descriptors the walks keep
