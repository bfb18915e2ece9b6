"""The guardian program (see guardian.py), started as ``python -I -c ...`` with the package's
own folder on its path: never with the working directory on it, where a planted
``trio_dpsup/_guardian_process.py`` would run as the supervisor's user.

It reads what the supervisor tells it on stdin, one line each::

    root RANK PID START       a rank's process (it leads the rank's session and group)
    seen RANK PID START       a member of rank RANK's tree, seen by the tree watch
    cgroup PATH               a rank's cgroup folder

At EOF — the supervisor closed the pipe after stopping its ranks, or died, even by SIGKILL —
it kills every member of the run's trees (see membership.py) and exits.

Standard library only: about 11 MB resident (bench: "idle: guardian RSS").
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable

from .cgroup import kill_cgroup
from .membership import Trees

__all__ = ["PRUNE_EVERY", "main", "read_registry"]

#: Lines read between prunes of what names only dead processes (see Trees.prune).
PRUNE_EVERY = 256


def read_registry(trees: Trees, lines: Iterable[bytes]) -> list[str]:
    """Apply each line to `trees`; return the cgroup folders named. Malformed lines are
    skipped: a guardian must kill what it can, whatever it was told."""
    cgroups: list[str] = []
    for count, raw in enumerate(lines, 1):
        if count % PRUNE_EVERY == 0:
            trees.prune()  # a run restarted thousands of times must not grow without bound
        words = raw.split()
        try:
            if words[0] == b"root":
                trees.add_root(int(words[1]), int(words[2]), int(words[3]))
            elif words[0] == b"seen":
                trees.remember(int(words[2]), int(words[3]), int(words[1]))
            elif words[0] == b"cgroup":
                cgroups.append(os.fsdecode(raw[len(b"cgroup ") :].rstrip(b"\n")))
        except (IndexError, ValueError):
            continue
    return cgroups


def main() -> None:
    # Signals meant for the supervisor's terminal or group must not end the guardian early.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_IGN)
    trees = Trees(sys.argv[1], exclude={os.getpid()})
    cgroups = read_registry(trees, sys.stdin.buffer)  # returns at EOF
    trees.kill_groups()
    for path in cgroups:
        kill_cgroup(path)
    trees.kill_members()


if __name__ == "__main__":
    main()
