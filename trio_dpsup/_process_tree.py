"""Finding, killing and reaping every process a rank left behind.

A rank's tree is found two ways, because each misses something the other sees:

* the rank's descendants, while the rank lives (psutil, by parent links);
* every process whose environment carries the rank's *tree cookie*, an environment variable
  set for the rank and inherited by everything it starts. This finds descendants that called
  setsid, double-forked, or re-parented to init or to us, which parent links lose. (Jenkins'
  ProcessTreeKiller uses the same technique.)

Waiting uses pidfds, which become readable when a process exits, whoever its parent is: no
polling. Psutil's `Process` objects guard every signal against pid reuse.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterable, Mapping

import psutil
import trio

from ._cookie import TREE_ENV

__all__ = ["TreeScanner", "kill_all", "reap", "scan_trees", "signal_all", "wait_gone"]

logger = logging.getLogger(__name__)


def scan_trees(roots: Mapping[str, int], since: float) -> dict[str, list[psutil.Process]]:
    """One pass over the process table: for each cookie in `roots` (cookie -> rank pid), every
    live process of that rank's tree, the rank itself excluded.

    `since` is the oldest rank's psutil create_time: the environment of older processes, which
    cannot belong to any rank, is not read. Blocking: run it in a thread.
    """
    parents: dict[int, int] = {}
    procs: dict[int, psutil.Process] = {}
    trees: dict[str, dict[int, psutil.Process]] = {cookie: {} for cookie in roots}
    for pid in psutil.pids():
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                parents[pid] = proc.ppid()
                if proc.create_time() < since or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                procs[pid] = proc
                cookie = proc.environ().get(TREE_ENV)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if cookie in trees:
            trees[cookie][pid] = proc
    # Descendants by parent links, for tree members that scrubbed their environment.
    for cookie, root in roots.items():
        for pid, proc in procs.items():
            if pid != root and _descends_from(pid, root, parents):
                trees[cookie].setdefault(pid, proc)
        trees[cookie].pop(root, None)
    return {cookie: list(tree.values()) for cookie, tree in trees.items()}


class TreeScanner:
    """Coalesces tree scans: every rank that asks while a scan runs shares its result.

    When all ranks stop at once, one pass over the process table serves them all, instead
    of one pass per rank competing for the interpreter while the control plane must answer.
    """

    def __init__(self) -> None:
        self._roots: dict[str, tuple[int, float]] = {}
        self._pending: trio.Event | None = None
        self._result: dict[str, list[psutil.Process]] = {}

    def register(self, cookie: str, root_pid: int, since: float) -> None:
        self._roots[cookie] = (root_pid, since)

    async def scan(self, cookie: str, *, fresh: bool = False) -> list[psutil.Process]:
        """The live tree of the rank registered under `cookie`, its own pid excluded.

        With `fresh`, the result comes from a scan that began after this call: nothing forked
        before the call can be missing from it.

        **Cancellation**: safe; a scan already running in its thread finishes unobserved.
        """
        if fresh and self._pending is not None:
            await self._pending.wait()  # it began before us; the next one will not have
        if self._pending is None:
            self._pending = done = trio.Event()
            roots = {c: pid for c, (pid, _) in self._roots.items()}
            since = min(created for _, created in self._roots.values())
            try:
                self._result = await trio.to_thread.run_sync(scan_trees, roots, since)
            finally:
                self._pending = None
                done.set()
        else:
            await self._pending.wait()
        return self._result.get(cookie, [])


def _descends_from(pid: int, root: int, parents: Mapping[int, int]) -> bool:
    seen = 0
    while pid in parents and seen < len(parents):  # bounded: a ppid loop cannot hang us
        pid = parents[pid]
        if pid == root:
            return True
        seen += 1
    return False


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
