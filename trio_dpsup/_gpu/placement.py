"""The placement check: is each rank on its own GPUs, alone, and nowhere else?

Pure: it takes which processes NVML sees on each device and who owns each pid, and returns a
verdict per rank. Who owns a pid is `_proc.owners`' answer (a rank's tree, by the rules of
the stop procedure); where the pids NVML reports are not ours to resolve (a container's own
pid namespace), the verdict is UNKNOWN rather than a guess.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .._proc.owners import Owner, OwnerKind
from .nvml import GpuProcess

__all__ = [
    "GpuHolder",
    "IssueKind",
    "Placement",
    "PlacementIssue",
    "PlacementVerdict",
    "check_placement",
]


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
