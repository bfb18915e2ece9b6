"""The supervisor's mutable state: one `Board` of `RankRecord`s, read through frozen snapshots.

Rank tasks and the prober write to the board; the control plane and the library handle only
read `SupervisorStatus` snapshots of it. Everything runs on one Trio thread, so no locks.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable

import trio

from .._config.plan import RankPlan
from .._errors import SupervisorFailure
from .._gpu.nvml import GpuSample, XidSeen
from .._gpu.placement import PENDING
from .._output.pump import RankOutput
from .status import (
    DrainEnd,
    DrainReason,
    DrainStatus,
    ProbeResult,
    ProgressStatus,
    RankState,
    RankStatus,
    RootCause,
    RouterStatus,
    SupervisorState,
    SupervisorStatus,
)

__all__ = ["Board", "RankRecord"]


class RankRecord:
    """The mutable state of one rank, written by its task and by the prober. A change of
    its state is announced through `on_change` (the board's version, for /ranks)."""

    def __init__(self, plan: RankPlan, on_change: Callable[[], None] = lambda: None) -> None:
        self.plan = plan
        self._state = RankState.PENDING
        self._on_change = on_change
        #: When the rank entered its state (wall clock, for /ranks).
        self.since = time.time()
        self.pid: int | None = None
        self.returncode: int | None = None
        #: The last exit status of any of its processes, kept across restarts (/metrics).
        self.last_returncode: int | None = None
        #: When it was last restarted (wall clock), once it has been.
        self.restarted_at: float | None = None
        self.last_probe: ProbeResult | None = None
        self.consecutive_failures = 0
        #: Set when the rank needed SIGKILL: it did not stop within the grace period.
        self.killed = False
        self.gpu_samples: tuple[GpuSample, ...] = ()
        self.placement = PENDING
        #: What the log pump keeps of the rank's output (the tail of its stderr).
        self.output = RankOutput()
        self.restarts = 0
        self.last_causes: collections.deque[SupervisorFailure] = collections.deque(maxlen=5)
        #: When this rank was restarted (trio.current_time()), for its backoff.
        self.restart_times: collections.deque[float] = collections.deque(maxlen=64)
        self.progress: ProgressStatus | None = None
        self.waiting: str | None = None
        self.evidence: str | None = None
        #: Operator controls (trio-dpsup ctl): drained (no traffic, still running); probes
        #: paused until this trio.current_time(); the next restart without backoff.
        self.drained = False
        self.probes_paused_until = 0.0
        self.restart_now = False
        #: The pids of the previous process's tree, once it is stopped: a restart waits for
        #: their GPU memory.
        self.previous_tree: frozenset[int] = frozenset()
        #: The cancel scope of the current process's life: cancelling it restarts the rank.
        self.incarnation: trio.CancelScope | None = None
        #: Its drain, while it is taken out before a planned stop (or drained by an
        #: operator): through `request_drain`, `note_inflight`, `end_drain`, `clear_drain`.
        self.drain: DrainStatus | None = None
        self._drain_request: DrainReason | None = None
        self._drain_wanted = trio.Event()

    # -- the drain: asked for by an operator or the shutdown, carried out by the rank's task

    def request_drain(self, reason: DrainReason) -> None:
        """Take the rank out now (/ranks, its /ranks/{r}/ready and the routers drop it, and
        it counts as out for the disruption budget from this moment), and ask its own task
        to drain it (and then, for a restart, to stop it)."""
        # A later request replaces an earlier one; `began` tells them apart (a strictly
        # later time, so that two requests in one clock tick do too).
        began = time.time()
        if self.drain is not None and began <= self.drain.began:
            began = math.nextafter(self.drain.began, math.inf)
        self.drain = DrainStatus(reason, began)
        self._drain_request = reason
        self._drain_wanted.set()
        self._on_change()

    async def next_drain_request(self) -> DrainReason:
        """Wait for the next `request_drain`; return its reason.

        **Cancellation**: safe; a request not yet taken stays for the next caller.
        """
        while True:  # a request withdrawn by `clear_drain` wakes it for nothing
            await self._drain_wanted.wait()
            self._drain_wanted = trio.Event()
            reason, self._drain_request = self._drain_request, None
            if reason is not None:
                return reason

    @property
    def serving(self) -> bool:
        """Ready and not taken out (see RankStatus.serving)."""
        return self.state is RankState.READY and not self.drained and self.drain is None

    def draining_since(self, began: float) -> bool:
        """Whether the drain that began at `began` is still the rank's: an undrain (or a
        new process) withdraws it, and a later request replaces it."""
        return self.drain is not None and self.drain.began == began

    def note_inflight(self, began: float, inflight: float | None) -> None:
        if self.drain is not None and self.draining_since(began):
            self.drain = dataclasses.replace(self.drain, inflight=inflight)

    def end_drain(self, began: float, end: DrainEnd, seconds: float) -> None:
        """Say how the drain that began at `began` ended (nothing if it was withdrawn)."""
        if self.drain is not None and self.draining_since(began):
            self.drain = dataclasses.replace(self.drain, end=end, seconds=seconds)
            self._on_change()

    def clear_drain(self) -> None:
        """Back in: a new process of the rank, or an operator's undrain."""
        self._drain_request = None
        if self.drain is not None:
            self.drain = None
            self._on_change()

    @property
    def state(self) -> RankState:
        return self._state

    @state.setter
    def state(self, state: RankState) -> None:
        if state is not self._state:
            self._state = state
            self.since = time.time()
            self._on_change()

    def snapshot(self) -> RankStatus:
        return RankStatus(
            rank=self.plan.rank,
            local_rank=self.plan.local_rank,
            port=self.plan.port,
            devices=self.plan.devices,
            state=self.state,
            pid=self.pid,
            returncode=self.returncode,
            last_probe=self.last_probe,
            consecutive_failures=self.consecutive_failures,
            command=self.plan.redacted_argv,
            gpus=self.plan.gpus,
            gpu_samples=self.gpu_samples,
            placement=self.placement,
            restarts=self.restarts,
            last_causes=tuple(self.last_causes),
            progress=self.progress,
            waiting=self.waiting,
            evidence=self.evidence,
            since=self.since,
            drained=self.drained,
            probes_paused_until=self.paused_until_wall(),
            drain=self.drain,
        )

    def paused_until_wall(self) -> float | None:
        """Until when its probes are paused (wall clock), or None when they are not."""
        left = self.probes_paused_until - trio.current_time()
        return time.time() + left if left > 0 else None


class Board:
    """All state of one supervisor run, and the events that announce its changes."""

    def __init__(
        self,
        plans: tuple[RankPlan, ...],
        run_id: str,
        nvml_unavailable: str | None = None,
        min_ready: int | None = None,
        group: bool = False,
        routers: tuple[str, ...] = (),
    ) -> None:
        self.run_id = run_id
        #: The routers fed with the ranks' URLs, by name (KIND=URL): see `set_router`.
        self.routers = {name: RouterStatus(name) for name in routers}
        self.group = group
        #: None (the default) means every rank.
        self.min_ready = len(plans) if min_ready is None else min_ready
        self.nvml_unavailable = nvml_unavailable
        #: Grows by one at every change of the supervisor's or a rank's state; `changed`
        #: is set (and replaced) at each, for the long polls of /ranks.
        self.version = 0
        self.changed = trio.Event()
        self.ranks = tuple(RankRecord(plan, self._bump) for plan in plans)
        self._state = SupervisorState.STARTING
        self.failure: SupervisorFailure | None = None
        self.started = False
        self.started_at = trio.current_time()
        #: When every rank was first ready (trio.current_time()), once they have been.
        self.ready_at: float | None = None
        #: Xid events NVML reported, newest last: (wall-clock time, device UUID, Xid).
        self.xid_events: collections.deque[XidSeen] = collections.deque(maxlen=64)
        self.all_ready = trio.Event()  # set once, when every rank is first ready
        self.stopping = trio.Event()  # set once, when shutdown or a failure begins

    @property
    def state(self) -> SupervisorState:
        return self._state

    @state.setter
    def state(self, state: SupervisorState) -> None:
        if state is not self._state:
            self._state = state
            self._bump()

    def touch(self) -> None:
        """Announce a change that is not a state change (a rank drained)."""
        self._bump()

    def _bump(self) -> None:
        self.version += 1
        changed, self.changed = self.changed, trio.Event()
        changed.set()

    def set_router(self, status: RouterStatus) -> None:
        """Record what a router's listing says (a change is announced, as a state's is)."""
        if self.routers.get(status.name) != status:
            self.routers[status.name] = status
            self._bump()

    def by_rank(self, rank: int) -> RankRecord | None:
        index = rank - self.ranks[0].plan.rank
        return self.ranks[index] if 0 <= index < len(self.ranks) else None

    def mark_ready(self, record: RankRecord) -> bool:
        """Mark `record` ready; True if that made every rank ready for the first time."""
        if record.state is not RankState.STARTING:
            return False  # stopping already: a late probe result must not revive it
        record.state = RankState.READY
        if self.started or any(r.state is not RankState.READY for r in self.ranks):
            return False
        self.started = True
        self.ready_at = trio.current_time()
        if self.state is SupervisorState.STARTING:
            self.state = SupervisorState.READY
        self.all_ready.set()
        return True

    def fail(self, failure: SupervisorFailure) -> SupervisorFailure:
        """Record `failure` if it is the first, stop answering ready, and return it to raise."""
        if self.failure is None:
            self.failure = failure
        self.begin_stopping(SupervisorState.STOPPING)
        return failure

    def begin_stopping(self, state: SupervisorState) -> None:
        """Enter DRAINING or STOPPING: /ready answers 503 from this moment on."""
        if self.state in (SupervisorState.STOPPING, SupervisorState.STOPPED):
            return
        self.state = state
        self.stopping.set()

    async def wait_settled(self) -> None:
        """Return once every rank is ready or shutdown has begun, whichever is first.

        **Cancellation**: safe; nothing changes.
        """
        async with trio.open_nursery() as nursery:

            async def wait_and_cancel(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            for event in (self.all_ready, self.stopping):
                nursery.start_soon(wait_and_cancel, event)

    def snapshot(self) -> SupervisorStatus:
        return SupervisorStatus(
            run_id=self.run_id,
            state=self.state,
            ranks=tuple(r.snapshot() for r in self.ranks),
            started=self.started,
            failure=self.failure,
            nvml_unavailable=self.nvml_unavailable,
            root_cause=self.root_cause(),
            min_ready=self.min_ready,
            version=self.version,
            group=self.group,
            routers=tuple(self.routers.values()),
        )

    def root_cause(self) -> RootCause | None:
        if self.failure is None:
            return None
        rank = self.failure.rank
        record = None if rank is None else self.by_rank(rank)
        tail = () if record is None else record.output.tail()
        evidence = None if record is None else record.evidence
        return RootCause(rank=rank, cause=str(self.failure), stderr_tail=tail, evidence=evidence)
