"""Whose a process is: a rank's (by its tree, see membership.py), an orphan of this run's
trees, outside them, or not resolvable here; and who holds a port a rank needs. What NVML
and the port checks report is named with these."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass

from .membership import ADOPTED, Trees

__all__ = ["ORPHAN", "OUTSIDE", "UNKNOWN", "Owner", "OwnerKind", "PortHolder", "owner_from_trees"]


class OwnerKind(enum.Enum):
    RANK = "rank"  # a process of a rank's tree
    ORPHAN = "orphan"  # adopted from this run's trees; which rank's cannot be told
    OUTSIDE = "outside"  # outside every rank tree of this run
    UNKNOWN = "unknown"  # a pid we cannot resolve: another pid namespace


@dataclass(frozen=True)
class Owner:
    """Whose a process is, as far as this run can tell."""

    kind: OwnerKind
    #: With OwnerKind.RANK: the rank.
    rank: int | None = None

    @classmethod
    def of_rank(cls, rank: int) -> Owner:
        return cls(OwnerKind.RANK, rank)

    @property
    def ours(self) -> bool:
        """In this run's trees (a rank's, or an orphan of them)."""
        return self.kind in (OwnerKind.RANK, OwnerKind.ORPHAN)

    def describe(self) -> str:
        if self.kind is OwnerKind.RANK:
            return f"rank {self.rank}"
        return _OWNER_NAMES[self.kind]


OUTSIDE = Owner(OwnerKind.OUTSIDE)
UNKNOWN = Owner(OwnerKind.UNKNOWN)
ORPHAN = Owner(OwnerKind.ORPHAN)

_OWNER_NAMES = {
    OwnerKind.ORPHAN: "an orphan of this run's trees, rank unknown",
    OwnerKind.OUTSIDE: "outside the supervised trees",
    OwnerKind.UNKNOWN: "not resolvable here (another pid namespace)",
}


@dataclass(frozen=True)
class PortHolder:
    """A process listening on a port a rank needs; pid None where /proc does not show it
    (another user's process, without privileges)."""

    pid: int | None
    command: str | None
    owner: Owner

    def describe(self) -> str:
        if self.pid is None:
            return "a process this user cannot see (run `ss -ltnp` as root)"
        whose = "ours: " + self.owner.describe() if self.owner.ours else "not ours"
        return f"pid {self.pid} ({self.command or '?'}; {whose})"


def owner_from_trees(trees: Trees) -> Callable[[int], Owner]:
    """`owner` for `check_placement`: the rank whose tree a pid is in, by the same rules as
    the stop procedure and the guardian (see membership.py), so a rank's engine process that
    renamed itself with setproctitle is still the rank's."""
    # In a container's own pid namespace, NVML may report host pids, which name other
    # processes here or none: only a pid we can place in a tree is known to be ours.
    not_ours = UNKNOWN if _in_child_pid_namespace() else OUTSIDE

    def owner(pid: int) -> Owner:
        try:
            rank = trees.owner(pid)
        except ProcessLookupError:
            return UNKNOWN  # NVML sees it, /proc does not: not our namespace
        if rank is None:
            return not_ours
        return ORPHAN if rank == ADOPTED else Owner.of_rank(rank)

    return owner


def _in_child_pid_namespace() -> bool:
    """True inside a container's pid namespace: NSpid lists one pid per nested namespace."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return len(line.split()) > 2
    except OSError:
        pass
    return False
