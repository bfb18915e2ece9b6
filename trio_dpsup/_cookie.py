"""The tree cookie: an environment variable that marks every process of a run's rank trees.

Each rank is started with ``TRIO_DPSUP_TREE=<run id>:<rank>``; everything it starts inherits
it, also after setsid, a double fork or re-parenting. The guardian carries
``<run id>:guardian``. Standard library only: the guardian process imports this module.
"""

from __future__ import annotations

import os

__all__ = ["TREE_ENV", "guardian_cookie", "marked", "rank_cookie"]

#: The environment variable that marks every process of a rank's tree.
TREE_ENV = "TRIO_DPSUP_TREE"


def rank_cookie(run_id: str, rank: int) -> str:
    return f"{run_id}:{rank}"


def guardian_cookie(run_id: str) -> str:
    return f"{run_id}:guardian"


def marked(run_id: str) -> dict[int, str]:
    """Every process that carries a cookie of run `run_id`, read from /proc: pid -> member
    (a rank number, or ``guardian``). Processes whose environment we may not read are
    skipped: not ours. Zombies have an empty environment, so they are not listed."""
    needle = f"{TREE_ENV}={run_id}:".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue  # gone, or not ours to read
        for var in environ.split(b"\0"):
            if var.startswith(needle):
                found[int(entry)] = var[len(needle) :].decode(errors="replace")
                break
    return found
