"""The placement check: is each rank on its own GPUs, alone, and nowhere else?

Pure: it takes which processes NVML sees on each device and who owns each pid, and returns a
verdict per rank. Who owns a pid is read from the tree cookie in its environment (see
_cookie); where the pids NVML reports are not ours to resolve (a container's own pid
namespace), the verdict is UNKNOWN rather than a guess.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .._proc.membership import ADOPTED, Trees
from .nvml import GpuProcess

__all__ = [
    "GpuHolder",
    "IssueKind",
    "Owner",
    "OwnerKind",
    "Placement",
    "PlacementIssue",
    "PlacementVerdict",
    "check_placement",
    "owner_from_trees",
]


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
class GpuHolder:
    """A process holding memory on a GPU: a leftover after shutdown, or a foreign holder
    before a rank starts."""

    pid: int
    #: Its process name, or None where /proc does not show it.
    name: str | None
    owner: Owner
    #: None where NVML does not report it (some drivers, MIG).
    memory_mib: int | None
    #: The device's label (``GPU 0 (GPU-…)``).
    gpu: str

    def describe(self) -> str:
        """``pid 123 (python, rank 1) holds 2048 MiB on GPU 0 (GPU-…)``."""
        name = self.name or "not visible here"
        whose = f", {self.owner.describe()}" if self.owner.ours else ""
        memory = "?" if self.memory_mib is None else str(self.memory_mib)
        return f"pid {self.pid} ({name}{whose}) holds {memory} MiB on {self.gpu}"


class PlacementVerdict(enum.Enum):
    PENDING = "pending"  # not checked yet: ranks not all ready
    OK = "ok"
    MISPLACED = "misplaced"  # see the issues
    UNKNOWN = "unknown"  # NVML's pids cannot be resolved here (containers)
    UNAVAILABLE = "unavailable"  # no NVML


class IssueKind(enum.Enum):
    WRONG_GPU = "wrong_gpu"  # a process of the rank's tree uses a GPU that is not its own
    ABSENT = "absent"  # no process of the rank's tree uses one of its GPUs
    FOREIGN = "foreign"  # a process outside the rank's tree uses one of its GPUs


@dataclass(frozen=True)
class PlacementIssue:
    kind: IssueKind
    #: The device's UUID.
    gpu: str
    pid: int | None
    #: Who the pid belongs to, for a FOREIGN issue.
    owner: Owner | None = None

    def describe(self, rank: int) -> str:
        if self.kind is IssueKind.WRONG_GPU:
            return f"rank {rank}: pid {self.pid} uses {self.gpu}, which is not one of its GPUs"
        if self.kind is IssueKind.ABSENT:
            return f"rank {rank}: no process of its tree uses its GPU {self.gpu}"
        owner = "?" if self.owner is None else self.owner.describe()
        return f"rank {rank}: pid {self.pid} ({owner}) uses its GPU {self.gpu}"


@dataclass(frozen=True)
class Placement:
    verdict: PlacementVerdict
    issues: tuple[PlacementIssue, ...] = ()
    #: Why the verdict is UNKNOWN or UNAVAILABLE.
    note: str | None = None


PENDING = Placement(PlacementVerdict.PENDING)


def check_placement(
    ranks: Mapping[int, Sequence[str]],
    on_device: Mapping[str, Sequence[GpuProcess]],
    owner: Callable[[int], Owner],
) -> dict[int, Placement]:
    """A verdict per rank.

    `ranks`: rank -> the UUIDs of its devices. `on_device`: every device NVML sees -> the
    processes with a compute context on it. `owner`: pid -> whose it is.
    """
    owners = {p.pid: owner(p.pid) for procs in on_device.values() for p in procs}
    verdicts = {}
    for rank, own in ranks.items():
        issues: list[PlacementIssue] = []
        unknown = False
        for gpu, procs in on_device.items():
            mine = gpu in own
            present = False
            for proc in procs:
                who = owners[proc.pid]
                if who.kind is OwnerKind.UNKNOWN:
                    unknown |= mine
                elif who == Owner.of_rank(rank):
                    present = True
                    if not mine:
                        issues.append(PlacementIssue(IssueKind.WRONG_GPU, gpu, proc.pid))
                elif mine:
                    issues.append(PlacementIssue(IssueKind.FOREIGN, gpu, proc.pid, who))
            if mine and not present and not unknown:
                issues.append(PlacementIssue(IssueKind.ABSENT, gpu, None))
        if issues:
            verdicts[rank] = Placement(PlacementVerdict.MISPLACED, tuple(issues))
        elif unknown:
            note = "NVML's pids are not visible here (another pid namespace)"
            verdicts[rank] = Placement(PlacementVerdict.UNKNOWN, note=note)
        else:
            verdicts[rank] = Placement(PlacementVerdict.OK)
    return verdicts


def owner_from_trees(trees: Trees) -> Callable[[int], Owner]:
    """`owner` for `check_placement`: the rank whose tree a pid is in, by the same rules as
    the stop procedure and the guardian (see _proc/membership.py), so a rank's engine process that
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
