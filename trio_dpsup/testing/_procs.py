"""Checking which processes of a supervised tree are still alive."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path

import psutil
import trio

from .._proc.process_tree import wait_gone

__all__ = ["alive", "read_pid_file", "wait_pids_gone"]


def alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def read_pid_file(path: Path) -> dict[str, int]:
    """The fake rank's ``--pid-file``: role (``rank``, ``grandchild-setsid``...) to pid."""
    roles: dict[str, int] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        roles[entry["role"]] = int(entry["pid"])
    return roles


async def wait_pids_gone(pids: Iterable[int], timeout: float) -> list[int]:  # noqa: ASYNC109
    """Wait up to `timeout` seconds for every pid to exit; return those still alive.

    Event-driven (a pidfd per process), so a process that exits is seen at once.
    """
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    with trio.move_on_after(timeout):
        await wait_gone(procs)
    return [proc.pid for proc in procs if alive(proc.pid)]
