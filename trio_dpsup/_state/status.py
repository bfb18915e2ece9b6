"""What the supervisor's state looks like from outside: its enums and the frozen snapshots
(`SupervisorStatus`, `RankStatus`) that the control plane, the library handle and the
harness read. The `Board` (board.py) is the one mutable place they are taken from."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .._errors import SupervisorFailure
from .._gpu.nvml import GpuInfo, GpuSample
from .._gpu.placement import PENDING, Placement

__all__ = [
    "CanaryResult",
    "CanaryStatus",
    "DrainEnd",
    "DrainReason",
    "DrainStatus",
    "GroupStatus",
    "MemberState",
    "MemberStatus",
    "ProbeResult",
    "ProgressStatus",
    "RankState",
    "RankStatus",
    "RootCause",
    "RouterStatus",
    "StartupProgress",
    "SupervisorState",
    "SupervisorStatus",
]


class RankState(enum.Enum):
    """The life of one rank."""

    PENDING = "pending"  # planned, not spawned yet
    STARTING = "starting"  # spawned, not yet answering its health path
    READY = "ready"  # answered 200 and has not failed `failure_threshold` probes since
    RESTARTING = "restarting"  # failed; being stopped, or waiting out its backoff, to restart
    STOPPING = "stopping"  # being stopped: signalled, within its grace period
    STOPPED = "stopped"  # exited after we asked it to
    FAILED = "failed"  # exited on its own, or failed its probes


class SupervisorState(enum.Enum):
    """The life of the supervisor as a whole. Only READY answers 200 on /ready."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  # shutdown requested; not ready, ranks still serving
    STOPPING = "stopping"  # ranks being signalled and killed
    STOPPED = "stopped"


class MemberState(enum.Enum):
    """The life of one member of a group across nodes, as the others see it."""

    NOT_APPEARED = "not yet appeared"  # never heard from (not failed: it may be starting)
    STARTING = "starting"  # heard from; not every rank of it is ready
    READY = "ready"  # every rank of it is ready
    DRAINING = "draining"  # a planned stop: the group drains, then stops
    STOPPING = "stopping"  # a planned stop, past its drain
    FAILED = "failed"  # it failed, or it saw the group fail: the group fails
    LOST = "lost"  # not heard from for longer than --peer-timeout: the group fails

    @property
    def planned_stop(self) -> bool:
        return self in (MemberState.DRAINING, MemberState.STOPPING)


class DrainReason(enum.Enum):
    """Why a rank is drained: what follows its drain."""

    DRAIN = "drain"  # an operator's drain: it stays out, running, until undrained
    RESTART = "restart"  # an operator's restart (or a rolling restart's): then stopped, started
    SHUTDOWN = "shutdown"  # the supervisor's SIGTERM or SIGINT: then stopped with every rank


class DrainEnd(enum.Enum):
    """How a drain ended."""

    EMPTY = "empty"  # the in-flight gauge read 0
    TIMEOUT = "timeout"  # --drain-timeout passed first: what was in flight is lost
    #: No gauge to read (none configured, metrics off, a rank not answering): it ended
    #: after --drain-delay.
    UNKNOWN = "unknown"
    SKIPPED = "skipped"  # ended early: a second signal, or a failure that stops every rank


@dataclass(frozen=True)
class DrainStatus:
    """A rank's drain: out of /ranks and every router, its in-flight requests awaited."""

    reason: DrainReason
    #: When it began (wall clock).
    began: float
    #: The last reading of the in-flight gauges (their sum); None before the first, or
    #: when they cannot be read.
    inflight: float | None = None
    #: How it ended, and how long it took; None while it goes on.
    end: DrainEnd | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class RouterStatus:
    """One router fed with the ranks' URLs (``--router``), as its own listing says."""

    name: str  # KIND=URL, as given
    #: The ranks its listing shows registered, as last read.
    listed: tuple[int, ...] = ()
    #: Why the last exchange with it failed; None once one passes.
    problem: str | None = None
    #: Exchanges that failed since the start (also in /metrics).
    errors: int = 0


@dataclass(frozen=True)
class ProbeResult:
    """One health probe of one rank."""

    ok: bool
    #: HTTP status, or None when no response came (refused, timed out).
    status_code: int | None
    error: str | None
    latency: float


@dataclass(frozen=True)
class ProgressStatus:
    """The last reading of a rank's progress (with ``progress_timeout``)."""

    #: The busy gauge and the progress counter, summed over their label sets.
    busy: float | None
    progress: float | None
    #: Seconds busy with the counter unmoved (0 while idle or advancing).
    stalled_for: float
    #: Why the last read failed (the rank is not failed for it); None after a good read.
    problem: str | None
    #: The limit in force: the fixed ``progress_timeout``, or the one learned (``auto``).
    limit: float | None = None
    #: With ``auto``: the gaps between progress seen while busy (it learns from 20 on).
    gaps: int = 0


@dataclass(frozen=True)
class StartupProgress:
    """What moves while a rank starts (with ``startup_stall_timeout``): the bytes its
    processes read from storage, its GPUs' memory in use, its output lines."""

    #: Summed over the rank's tree (None when /proc/PID/io cannot be read).
    read_bytes: int | None
    #: Summed over its GPUs (None without NVML readings).
    gpu_memory: int | None
    lines: int
    #: What moved last ("bytes read", "GPU memory", "output lines"), and when (wall
    #: clock); None while nothing has.
    last_moved: str | None
    last_moved_at: float | None
    #: Seconds with nothing moving (since the last move, or since the process started).
    still_for: float


@dataclass(frozen=True)
class CanaryResult:
    """One canary (a one-token generation) sent to an idle rank."""

    ok: bool
    #: HTTP status, or None when no answer came (refused, timed out).
    status_code: int | None
    error: str | None
    latency: float
    #: When it was answered (or given up on): wall clock, seconds since the epoch.
    at: float


@dataclass(frozen=True)
class CanaryStatus:
    """A rank's canaries, with ``canary`` on."""

    #: Canaries sent to the rank (all its processes), and how many failed.
    sent: int = 0
    failed: int = 0
    #: The last one; None before the first.
    last: CanaryResult | None = None
    #: Why canaries are off for this rank (its first was refused: a configuration error,
    #: logged once with the fix); None while they are on.
    off: str | None = None
    #: Why the gauges that tell an idle rank could not be read (no canary is sent then).
    problem: str | None = None


@dataclass(frozen=True)
class RankStatus:
    rank: int
    local_rank: int
    port: int
    devices: tuple[str, ...]
    state: RankState
    pid: int | None
    returncode: int | None
    last_probe: ProbeResult | None
    consecutive_failures: int
    #: The command line with secrets redacted.
    command: tuple[str, ...]
    #: The NVML devices behind `devices` (empty without NVML), and their latest readings.
    gpus: tuple[GpuInfo, ...] = ()
    gpu_samples: tuple[GpuSample, ...] = ()
    placement: Placement = PENDING
    #: Times the rank was restarted, and the causes of its last restarts, oldest first.
    restarts: int = 0
    last_causes: tuple[SupervisorFailure, ...] = ()
    #: With the progress check: its last reading; None before the first, or when it is off.
    progress: ProgressStatus | None = None
    #: What a restart waits for before it starts the process (a held port, GPU memory).
    waiting: str | None = None
    #: The folder of the evidence of its last failure (with ``evidence_dir``).
    evidence: str | None = None
    #: When it entered its state (wall clock, seconds since the epoch).
    since: float = 0.0
    #: Drained by an operator: it keeps running, but takes no traffic (see /ranks).
    drained: bool = False
    #: Until when an operator paused its probes (wall clock), while they are paused.
    probes_paused_until: float | None = None
    #: Its drain, from the moment it is taken out until its process stops (or, for an
    #: operator's drain, until it is undrained).
    drain: DrainStatus | None = None
    #: A failure was seen and its cause is being settled (a probe failure waits briefly for
    #: the process's own exit, the truer cause): out of traffic meanwhile.
    failing: bool = False
    #: Its canaries, with ``canary`` on; None when it is off.
    canary: CanaryStatus | None = None
    #: While it starts, with ``startup_stall_timeout``: what moves; None otherwise.
    startup: StartupProgress | None = None

    @property
    def ready(self) -> bool:
        return self.state is RankState.READY

    @property
    def out(self) -> bool:
        """Taken out of traffic: drained by an operator, draining before a stop, or failing."""
        return self.drained or self.drain is not None or self.failing

    @property
    def serving(self) -> bool:
        """Ready and not taken out: what --min-ready counts and routers are given."""
        return self.ready and not self.out


@dataclass(frozen=True)
class RootCause:
    """Why the supervisor stopped: the first failure, and what its rank last said."""

    rank: int | None
    cause: str
    #: The last lines the rank wrote to stderr (up to 20), oldest first.
    stderr_tail: tuple[str, ...]
    #: The folder of the failure's evidence (with ``evidence_dir``).
    evidence: str | None = None

    def report(self) -> str:
        """The log record: the cause on its first line, then the rank's last lines."""
        if self.rank is None:
            return self.cause
        evidence = "" if self.evidence is None else f"\n    evidence: {self.evidence}"
        if not self.stderr_tail:
            return f"{self.cause}{evidence}\n    rank {self.rank} wrote nothing to stderr"
        lines = "".join(f"\n    | {line}" for line in self.stderr_tail)
        return (
            f"{self.cause}{evidence}\n    the last lines rank {self.rank} wrote to stderr:{lines}"
        )


@dataclass(frozen=True)
class MemberStatus:
    """One member of the group, as this member last heard of it."""

    member: int
    #: How it names its node (its control plane's address), once heard from.
    node: str | None
    state: MemberState
    #: Why it failed (the group's first failure, as it told it), once it has.
    cause: str | None = None
    #: When this member last heard from it directly (wall clock); None: never, or only
    #: through another member.
    heard: float | None = None


@dataclass(frozen=True)
class GroupStatus:
    """The group across nodes this supervisor is a member of."""

    group_id: str
    #: The group's generation (its first member's run): words from members of another
    #: generation are ignored. None until learned.
    generation: str | None
    #: This member's index.
    member: int
    #: Every member, this one included, by index.
    members: tuple[MemberStatus, ...]

    @property
    def ready(self) -> bool:
        """Every other member reports every rank of its own ready."""
        return all(m.state is MemberState.READY for m in self.members if m.member != self.member)

    def not_ready(self) -> tuple[MemberStatus, ...]:
        return tuple(
            m for m in self.members if m.member != self.member and m.state is not MemberState.READY
        )


@dataclass(frozen=True)
class SupervisorStatus:
    #: Names this run; every process of its trees carries it in TRIO_DPSUP_TREE.
    run_id: str
    state: SupervisorState
    ranks: tuple[RankStatus, ...]
    #: Every rank has been ready at least once (what /startupz reports).
    started: bool
    #: The first failure, once there is one.
    failure: SupervisorFailure | None
    #: Why NVML is not used (no driver, no GPU...); None when it is.
    nvml_unavailable: str | None = None
    #: Once a failure is recorded: its rank, its cause, and that rank's last stderr lines.
    root_cause: RootCause | None = None
    #: Ready ranks /ready needs once every rank has been ready: all of them, unless
    #: ``min_ready`` was configured (the supervisor always sets it).
    min_ready: int = 0
    #: Grows at every change of the supervisor's or a rank's state (see /ranks).
    version: int = 0
    #: The ranks form one group (restarted as one; /ready needs every rank), not
    #: independent replicas.
    group: bool = False
    #: The routers fed with the ranks' URLs (``--router``).
    routers: tuple[RouterStatus, ...] = ()
    #: The group across nodes this supervisor is a member of (--group-peer, LeaderWorkerSet).
    members: GroupStatus | None = None

    @property
    def ranks_ready(self) -> bool:
        """Serving, and enough of this node's ranks ready (they may be restarting)."""
        return self.state is SupervisorState.READY and self.serving() >= self.min_ready

    @property
    def ready(self) -> bool:
        """What /ready answers: this node's ranks ready (`ranks_ready`) and, in a group
        across nodes, every other member's too."""
        return self.ranks_ready and (self.members is None or self.members.ready)

    def serving(self) -> int:
        """Ranks that take traffic: ready and not taken out (what --min-ready counts)."""
        return sum(r.serving for r in self.ranks)

    @property
    def stopping(self) -> bool:
        """Shutdown or a failure has begun: nothing should be routed here any more."""
        return self.state not in (SupervisorState.STARTING, SupervisorState.READY)

    def takes_traffic(self, rank: RankStatus) -> bool:
        """What /ranks/{r}/ready, /ranks and the routers say of `rank`: ready, not taken
        out, and no shutdown begun."""
        return rank.serving and not self.stopping

    def not_ready(self) -> tuple[int, ...]:
        return tuple(r.rank for r in self.ranks if not r.ready)
