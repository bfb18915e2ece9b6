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
from collections.abc import Iterable

import psutil
import trio

__all__ = ["TREE_ENV", "kill_all", "reap", "signal_all", "snapshot_tree", "wait_gone"]

logger = logging.getLogger(__name__)

#: The environment variable that marks every process of a rank's tree.
TREE_ENV = "TRIO_DPSUP_TREE"


def snapshot_tree(root_pid: int, cookie: str, since: float) -> list[psutil.Process]:
    """Every live process of a rank's tree, the rank itself (`root_pid`) excluded.

    `since` is the rank's psutil create_time: the environment of older processes, which cannot
    belong to it, is not read. Blocking: run it in a thread.
    """
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        for child in psutil.Process(root_pid).children(recursive=True):
            found[child.pid] = child
    for pid in psutil.pids():
        if pid in found or pid == root_pid:
            continue
        try:
            proc = psutil.Process(pid)
            if proc.create_time() < since:
                continue
            if proc.environ().get(TREE_ENV) == cookie:
                found[pid] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return list(found.values())


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
