"""The stop procedure of one rank, and the grace deadline that all ranks share.

Forward the signal to the rank's process group (and to tree members that left the group),
with SIGCONT after it so that a stopped process acts on it; wait for the whole tree up to
the shared grace deadline, then SIGKILL whatever is left, wait a bounded time, reap, and
name by pid anything that could not be killed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import trio

from .membership import Trees
from .process_tree import TreeScanner, kill_all, process_of, reap, signal_all, wait_gone
from .spawn import RankProcess

__all__ = ["StopClock", "StopOutcome", "stop_rank", "sweep_orphans"]

logger = logging.getLogger(__name__)

#: How long to wait after SIGKILL. Any process outside uninterruptible sleep dies within
#: milliseconds; one that outlives this is reported by pid instead of hanging shutdown.
KILL_TIMEOUT = 2.0
#: A repeated signal within this many seconds of the first is the same request: coreutils'
#: `timeout` sends SIGTERM twice a few milliseconds apart (to us, then to our group), and
#: two signals in one scheduler tick cannot be told apart anyway. Past it, "kill now".
SECOND_SIGNAL_AFTER = 0.1


class StopClock:
    """One grace deadline for every rank, fixed when the first rank starts stopping.

    `kill_now` (a second signal) moves it to the past: every rank still in its grace period
    goes straight to SIGKILL — those stopping for a restart too, on the clocks made by
    `for_restart`.
    """

    def __init__(self, grace_period: float) -> None:
        self._grace_period = grace_period
        self._deadline: float | None = None
        self._scopes: set[trio.CancelScope] = set()
        self._restarts: weakref.WeakSet[StopClock] = weakref.WeakSet()
        #: The signal forwarded to ranks: the one the supervisor received, else SIGTERM.
        self.signum: int = signal.SIGTERM

    def for_restart(self) -> StopClock:
        """A clock for one rank's restart: a grace period of its own, starting when that
        rank starts stopping, which this clock's `kill_now` ends as well."""
        clock = StopClock(self._grace_period)
        self._restarts.add(clock)
        if self._deadline == -math.inf:
            clock.kill_now()
        return clock

    @property
    def deadline(self) -> float:
        if self._deadline is None:
            self._deadline = trio.current_time() + self._grace_period
        return self._deadline

    @contextlib.contextmanager
    def grace(self) -> Iterator[trio.CancelScope]:
        """A cancel scope that ends at the shared deadline, or at `kill_now`."""
        with trio.CancelScope(deadline=self.deadline) as scope:
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[trio.CancelScope]:
        """A cancel scope that `kill_now` (a second signal) cancels: for the waits before a
        stop (a drain), which a second signal skips."""
        with trio.CancelScope() as scope:
            if self.killed_now:
                scope.cancel()
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)

    @property
    def killed_now(self) -> bool:
        """Whether `kill_now` cut the grace period short."""
        return self._deadline == -math.inf

    def kill_now(self) -> None:
        self._deadline = -math.inf
        for scope in self._scopes:
            scope.deadline = -math.inf
        for clock in list(self._restarts):
            clock.kill_now()


@dataclass(frozen=True)
class StopOutcome:
    #: Every process exited within the grace period.
    graceful: bool
    #: The pids of the tree that was stopped.
    pids: frozenset[int]


async def stop_rank(
    rank: int, process: RankProcess, scanner: TreeScanner, clock: StopClock
) -> StopOutcome:
    """Stop a rank and its whole tree; say whether it all exited within the grace period,
    and which pids it had.

    Also right for a rank that already exited: its leftovers are stopped the same way.

    **Cancellation**: not cancellable in practice; callers shield it, and it is bounded by
    the grace deadline plus KILL_TIMEOUT.
    """
    signum = clock.signum
    process.signal_group(signum)
    # A stopped process (SIGSTOP, a job-control stop, a debugger cut off mid-attach) only
    # acts on the signal once it runs again: continue it right after, as systemd and the
    # kubelet's runtimes do, or it would hold the whole grace period.
    process.signal_group(signal.SIGCONT)
    # After the signal, not before: the signal must not wait on a process-table scan.
    tree = await scanner.scan(rank)
    outside = _outside_group(tree, process.pid)
    signal_all(outside, signum)
    signal_all(outside, signal.SIGCONT)

    graceful = False
    with clock.grace():
        await process.wait()
        await wait_gone(tree)
        graceful = True
    if not graceful:
        logger.warning(
            "rank %d did not stop within the grace period: killing its tree",
            rank,
            extra={"rank": rank},
        )
        process.signal_group(signal.SIGKILL)

    # Scan again: the tree may have forked between the first scan and the signal.
    late = await scanner.scan(rank, fresh=True)
    seen = {proc.pid for proc in tree}
    forked = any(proc.pid not in seen for proc in late)
    tree = _union(tree, late)
    survivors = await kill_all(tree, KILL_TIMEOUT)
    # A process that forks and exits in a loop outruns any one scan. Passes that kill on
    # sight, until one finds nothing alive: always over the orphans we adopted (cheap, and
    # where such a process lands at every step); over the whole table too when the tree
    # was still forking (a member the first scan had not seen).
    if forked:
        known = {proc.pid for proc in survivors}
        again = [p for p in await scanner.scan(rank, fresh=True) if p.pid not in known]
        await scanner.kill_members([rank], scan=bool(again))
        survivors = _union(survivors, await kill_all(again, KILL_TIMEOUT))
        tree = _union(tree, again)
    else:
        await scanner.kill_members([rank], scan=False)
    with trio.move_on_after(KILL_TIMEOUT):
        await process.wait()
    reap(tree)
    if process.returncode is None:
        survivors.append(psutil.Process(process.pid))
    if survivors:
        logger.error(
            "rank %d: could not kill pids %s (uninterruptible sleep?); they are left running",
            rank,
            ", ".join(str(p.pid) for p in survivors),
        )
    return StopOutcome(graceful, frozenset({process.pid, *(p.pid for p in tree)}))


def _outside_group(procs: list[psutil.Process], pgid: int) -> list[psutil.Process]:
    """Tree members that left the rank's process group, and so missed its signal.

    Group members must not get the signal twice: many servers treat a second SIGINT as
    "quit now, skip cleanup".
    """
    outside = []
    for proc in procs:
        try:
            if os.getpgid(proc.pid) != pgid:
                outside.append(proc)
        except ProcessLookupError:
            continue
    return outside


def _union(first: list[psutil.Process], second: list[psutil.Process]) -> list[psutil.Process]:
    seen = {p.pid: p for p in first}
    for proc in second:
        seen.setdefault(proc.pid, proc)
    return list(seen.values())


async def sweep_orphans(trees: Trees, scanner: TreeScanner, clock: StopClock) -> None:
    """Stop the orphans this subreaper adopted from the trees whose rank could not be
    told (no rank's stop took them: a setsid, double-forked, renamed process). They get
    the forwarded signal and what is left of the shared grace period, then kill passes.

    **Cancellation**: shielded; bounded by the grace deadline and the kill passes.
    """
    with trio.CancelScope(shield=True):
        orphans = [stat for stat, _ in trees.adopted()]
        if not orphans:
            return
        logger.warning(
            "stopping pids %s: orphans adopted from the rank trees",
            ", ".join(str(stat.pid) for stat in orphans),
        )
        procs = [proc for stat in orphans if (proc := process_of(stat)) is not None]
        signal_all(procs, clock.signum)
        signal_all(procs, signal.SIGCONT)
        with clock.grace():
            await wait_gone(procs)
        await scanner.kill_members(None)
