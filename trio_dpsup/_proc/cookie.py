"""The tree cookie: an environment variable that marks every process of a run's rank trees.

Each rank is started with ``TRIO_DPSUP_TREE=<run id>:<rank>``; everything it starts inherits
it, also after setsid, a double fork or re-parenting. The guardian carries
``<run id>:guardian``. Standard library only: the guardian process imports this module.
"""

from __future__ import annotations

import os

__all__ = ["TREE_ENV", "guardian_cookie", "marked", "member_of", "rank_cookie"]

#: The environment variable that marks every process of a rank's tree.
TREE_ENV = "TRIO_DPSUP_TREE"


def rank_cookie(run_id: str, rank: int) -> str:
    return f"{run_id}:{rank}"


def guardian_cookie(run_id: str) -> str:
    return f"{run_id}:guardian"


def member_of(pid: int, run_id: str) -> str | None:
    """What `pid`'s cookie of run `run_id` names (a rank number, or ``guardian``); None
    without one, or when its environment cannot be read (gone, not ours, or a zombie)."""
    needle = f"{TREE_ENV}={run_id}:".encode()
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return None
    for var in environ.split(b"\0"):
        if var.startswith(needle):
            return var[len(needle) :].decode(errors="replace")
    return None


def marked(run_id: str) -> dict[int, str]:
    """Every process that carries a cookie of run `run_id`, read from /proc: pid -> member.
    Processes whose environment we may not read are skipped: not ours. Zombies have an
    empty environment, so they are not listed."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (member := member_of(int(entry), run_id)) is not None:
            found[int(entry)] = member
    return found
