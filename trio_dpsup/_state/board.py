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

from .._config.group import GroupPlan
from .._config.plan import RankPlan
from .._errors import SupervisorFailure
from .._gpu.nvml import GpuSample, XidSeen
from .._gpu.placement import PENDING, Placement
from .._output.pump import RankOutput
from .group import GroupView
from .status import (
    CanaryResult,
    CanaryStatus,
    DrainEnd,
    DrainReason,
    DrainStatus,
    ProbeResult,
    ProgressStatus,
    RankState,
    RankStatus,
    RootCause,
    RouterStatus,
    StartupProgress,
    SupervisorState,
    SupervisorStatus,
)

__all__ = ["Board", "RankRecord"]


class RankRecord:
    """The state of one rank. Read anywhere; changed only through its verbs, each one
    transition of its life (as h11's state machine keeps its own): `started`, `mark_ready`
    (the board's), `record_probe`, `failing`, `fail`, `request_restart`, `begin_stop`,
    `stopped`, `restarted`, the drain's verbs and the operator's (`set_drained`,
    `pause_probes`). Its fields are read-only properties: a module outside `_state` cannot
    assign them (tests/test_board.py holds it). A change of its state is announced through
    `on_change` (the board's version, for /ranks)."""

    __slots__ = (
        "_canary",
        "_consecutive_failures",
        "_cut",
        "_drain",
        "_drain_request",
        "_drain_wanted",
        "_drained",
        "_evidence",
        "_failing",
        "_gpu_samples",
        "_killed",
        "_last_causes",
        "_last_probe",
        "_last_returncode",
        "_live",
        "_on_change",
        "_output",
        "_pid",
        "_placement",
        "_plan",
        "_previous_tree",
        "_probes_paused_until",
        "_progress",
        "_restart_now",
        "_restart_times",
        "_restarted_at",
        "_restarts",
        "_returncode",
        "_since",
        "_startup",
        "_state",
        "_waiting",
    )  # fmt: skip

    def __init__(self, plan: RankPlan, on_change: Callable[[], None] = lambda: None) -> None:
        self._plan = plan
        self._state = RankState.PENDING
        self._on_change = on_change
        self._since = time.time()
        self._pid: int | None = None
        self._returncode: int | None = None
        self._last_returncode: int | None = None
        self._restarted_at: float | None = None
        self._last_probe: ProbeResult | None = None
        self._consecutive_failures = 0
        self._killed = False
        self._gpu_samples: tuple[GpuSample, ...] = ()
        self._placement = PENDING
        self._output = RankOutput()
        self._restarts = 0
        self._last_causes: collections.deque[SupervisorFailure] = collections.deque(maxlen=5)
        self._restart_times: collections.deque[float] = collections.deque(maxlen=64)
        self._progress: ProgressStatus | None = None
        self._canary: CanaryStatus | None = None
        self._startup: StartupProgress | None = None
        self._waiting: str | None = None
        self._evidence: str | None = None
        self._drained = False
        self._probes_paused_until = 0.0
        self._restart_now = False
        self._previous_tree: frozenset[int] = frozenset()
        self._live = False
        self._failing = False
        self._cut = trio.Event()
        self._drain: DrainStatus | None = None
        self._drain_request: DrainReason | None = None
        self._drain_wanted = trio.Event()

    # -- what it is (read-only)

    @property
    def plan(self) -> RankPlan:
        return self._plan

    @property
    def state(self) -> RankState:
        return self._state

    @property
    def since(self) -> float:
        """When the rank entered its state (wall clock, for /ranks)."""
        return self._since

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def returncode(self) -> int | None:
        """The exit status of its current (or last) process, once it exited."""
        return self._returncode

    @property
    def last_returncode(self) -> int | None:
        """The last exit status of any of its processes, kept across restarts (/metrics)."""
        return self._last_returncode

    @property
    def restarted_at(self) -> float | None:
        """When it was last restarted (wall clock), once it has been."""
        return self._restarted_at

    @property
    def last_probe(self) -> ProbeResult | None:
        return self._last_probe

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    @property
    def killed(self) -> bool:
        """It needed SIGKILL at the shutdown: it did not stop within the grace period."""
        return self._killed

    @property
    def gpu_samples(self) -> tuple[GpuSample, ...]:
        return self._gpu_samples

    @property
    def placement(self) -> Placement:
        return self._placement

    @property
    def output(self) -> RankOutput:
        """What the log pump keeps of the rank's output (the tail of its stderr)."""
        return self._output

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def last_causes(self) -> tuple[SupervisorFailure, ...]:
        """The causes of its last restarts (at most 5), oldest first."""
        return tuple(self._last_causes)

    @property
    def restart_times(self) -> tuple[float, ...]:
        """When it was restarted (trio.current_time()), for its backoff; oldest first."""
        return tuple(self._restart_times)

    @property
    def progress(self) -> ProgressStatus | None:
        return self._progress

    @property
    def startup(self) -> StartupProgress | None:
        """What moved while its current process started (with ``startup_stall_timeout``)."""
        return self._startup

    @property
    def canary(self) -> CanaryStatus | None:
        """Its canaries (with ``canary`` on): counts kept across restarts."""
        return self._canary

    @property
    def waiting(self) -> str | None:
        """What a restart waits for before it starts the process (a held port, GPU memory)."""
        return self._waiting

    @property
    def evidence(self) -> str | None:
        return self._evidence

    @property
    def drained(self) -> bool:
        """Drained by an operator (trio-dpsup ctl): no traffic, still running."""
        return self._drained

    @property
    def probes_paused(self) -> bool:
        """An operator paused its probes, until a time not yet reached."""
        return trio.current_time() < self._probes_paused_until

    @property
    def previous_tree(self) -> frozenset[int]:
        """The pids of the previous process's tree, once it is stopped: a restart waits for
        their GPU memory."""
        return self._previous_tree

    @property
    def drain(self) -> DrainStatus | None:
        """Its drain, while it is taken out before a planned stop (or drained by an
        operator)."""
        return self._drain

    @property
    def serving(self) -> bool:
        """Ready and not taken out (see RankStatus.serving)."""
        return self._state is RankState.READY and not self.out

    @property
    def out(self) -> bool:
        """Taken out of traffic: drained, draining, or failing (its verdict pending)."""
        return self._drained or self._drain is not None or self._failing

    # -- its process's life, as its task lives it (_ranks/rank.py)

    def _enter(self, state: RankState) -> None:
        if state is not self._state:
            self._state = state
            self._since = time.time()
            self._on_change()

    def started(self, pid: int) -> None:
        """A new process runs: STARTING, its readings start again, and it serves again
        once ready (an operator's `drained` stays)."""
        self._pid = pid
        self._returncode = None
        self._progress = None
        self._startup = None
        self._failing = False
        self._live = True
        self._cut = trio.Event()
        self.clear_drain()
        self._enter(RankState.STARTING)

    def exited(self, returncode: int) -> None:
        """Its process exited (on its own, or after it was signalled)."""
        self._returncode = returncode
        self._last_returncode = returncode  # kept across its restart

    def failing(self) -> None:
        """A failure was seen and its cause is being settled (`_ranks.rank.VERDICT_WINDOW`):
        out of traffic, and of every router, from now on."""
        if not self._failing:
            self._failing = True
            self._on_change()

    def fail(self) -> None:
        """Failed, and not to be restarted."""
        self._enter(RankState.FAILED)

    def request_restart(self, cause: SupervisorFailure, *, drain: bool) -> bool:
        """The one way a running rank is restarted from outside its own failure. With
        `drain` (an operator's restart: no backoff), its task drains it first; without (a
        group restarting with a failed rank), it is cut at once. False when it has no
        process to restart (starting, or between two)."""
        if not self._live:
            return False
        self._last_causes.append(cause)
        if drain:
            self._restart_now = True
            self.request_drain(DrainReason.RESTART)
        else:
            self._enter(RankState.RESTARTING)
            self._cut.set()
        return True

    async def until_cut(self) -> None:
        """Wait until `request_restart` cuts the current process.

        **Cancellation**: safe.
        """
        await self._cut.wait()

    def restarting(self, cause: SupervisorFailure) -> None:
        """Its own failure is to be mended by a restart."""
        self._last_causes.append(cause)
        self._enter(RankState.RESTARTING)

    def begin_stop(self, shutdown: bool) -> None:
        """Its process is being stopped: for the shutdown (STOPPING), or for a restart."""
        self._live = False
        if self._state not in (RankState.FAILED, RankState.RESTARTING):
            self._enter(RankState.STOPPING if shutdown else RankState.RESTARTING)

    def stopped(self, pids: frozenset[int], returncode: int | None, killed: bool) -> bool:
        """Its process's tree is stopped (`pids`, for the restart's GPU wait), `killed` if
        that took SIGKILL at the shutdown; True if that was its final stop (STOPPED)."""
        self._previous_tree = pids
        self._killed = self._killed or killed
        self._returncode = returncode
        if returncode is not None:
            self._last_returncode = returncode
        if self._state is RankState.STOPPING:
            self._enter(RankState.STOPPED)
            return True
        return False

    def restarted(self) -> bool:
        """Count a restart; True if an operator asked for it (no backoff, no alarm)."""
        self._restarts += 1
        self._restart_times.append(trio.current_time())
        self._restarted_at = time.time()
        asked, self._restart_now = self._restart_now, False
        return asked

    # -- what its watchers see

    def reset_probes(self) -> None:
        self._consecutive_failures = 0

    def record_probe(self, result: ProbeResult) -> int:
        """One health probe; the failures in a row, counting it."""
        self._last_probe = result
        self._consecutive_failures = 0 if result.ok else self._consecutive_failures + 1
        return self._consecutive_failures

    def note_progress(self, progress: ProgressStatus) -> None:
        self._progress = progress

    def note_startup(self, progress: StartupProgress) -> None:
        """A reading of what moves while it starts."""
        self._startup = progress

    def record_canary(self, result: CanaryResult) -> None:
        """One canary sent and answered (or given up on)."""
        last = self._canary or CanaryStatus()
        self._canary = dataclasses.replace(
            last, sent=last.sent + 1, failed=last.failed + (not result.ok), last=result
        )

    def canary_off(self, why: str) -> None:
        """Canaries are off for this rank from now on (a configuration error: see `off`)."""
        self._canary = dataclasses.replace(self._canary or CanaryStatus(), off=why)

    def canary_problem(self, problem: str | None) -> None:
        """Why the rank's idle gauges cannot be read now (None: they can)."""
        last = self._canary or CanaryStatus()
        if last.problem != problem:
            self._canary = dataclasses.replace(last, problem=problem)

    def set_waiting(self, what: str | None) -> None:
        self._waiting = what

    def note_gpus(self, samples: tuple[GpuSample, ...]) -> None:
        self._gpu_samples = samples

    def place(self, placement: Placement) -> bool:
        """Its GPU placement's verdict; True if it changed."""
        if placement == self._placement:
            return False
        self._placement = placement
        return True

    def set_evidence(self, folder: str | None) -> None:
        self._evidence = folder

    # -- the operator's controls (trio-dpsup ctl)

    def set_drained(self, drained: bool) -> bool:
        """Drain (no traffic, still running) or undrain; True if a drain began (it was
        ready): its task then waits for what is in flight."""
        self._drained = drained
        began = drained and self._state is RankState.READY
        if began:
            self.request_drain(DrainReason.DRAIN)
        elif not drained:
            self.clear_drain()
        self._on_change()  # /ranks long polls hear of it
        return began

    def pause_probes(self, seconds: float) -> None:
        self._probes_paused_until = trio.current_time() + seconds
        self._on_change()

    def resume_probes(self) -> None:
        self._probes_paused_until = 0.0
        self._on_change()

    # -- the drain: asked for by an operator or the shutdown, carried out by the rank's task

    def request_drain(self, reason: DrainReason) -> None:
        """Take the rank out now (/ranks, its /ranks/{r}/ready and the routers drop it, and
        it counts as out for the disruption budget from this moment), and ask its own task
        to drain it (and then, for a restart, to stop it)."""
        # A later request replaces an earlier one; `began` tells them apart (a strictly
        # later time, so that two requests in one clock tick do too).
        began = time.time()
        if self._drain is not None and began <= self._drain.began:
            began = math.nextafter(self._drain.began, math.inf)
        self._drain = DrainStatus(reason, began)
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

    def draining_since(self, began: float) -> bool:
        """Whether the drain that began at `began` is still the rank's: an undrain (or a
        new process) withdraws it, and a later request replaces it."""
        return self._drain is not None and self._drain.began == began

    def note_inflight(self, began: float, inflight: float | None) -> None:
        if self._drain is not None and self.draining_since(began):
            self._drain = dataclasses.replace(self._drain, inflight=inflight)

    def end_drain(self, began: float, end: DrainEnd, seconds: float) -> None:
        """Say how the drain that began at `began` ended (nothing if it was withdrawn)."""
        if self._drain is not None and self.draining_since(began):
            self._drain = dataclasses.replace(self._drain, end=end, seconds=seconds)
            self._on_change()

    def clear_drain(self) -> None:
        """Back in: a new process of the rank, or an operator's undrain."""
        self._drain_request = None
        if self._drain is not None:
            self._drain = None
            self._on_change()

    def snapshot(self) -> RankStatus:
        return RankStatus(
            rank=self.plan.rank,
            local_rank=self.plan.local_rank,
            port=self.plan.port,
            devices=self.plan.devices,
            state=self._state,
            pid=self._pid,
            returncode=self._returncode,
            last_probe=self._last_probe,
            consecutive_failures=self._consecutive_failures,
            command=self.plan.redacted_argv,
            gpus=self.plan.gpus,
            gpu_samples=self._gpu_samples,
            placement=self._placement,
            restarts=self._restarts,
            last_causes=self.last_causes,
            progress=self._progress,
            waiting=self._waiting,
            evidence=self._evidence,
            since=self._since,
            drained=self._drained,
            probes_paused_until=self.paused_until_wall(),
            drain=self._drain,
            failing=self._failing,
            canary=self._canary,
            startup=self._startup,
        )

    def paused_until_wall(self) -> float | None:
        """Until when its probes are paused (wall clock), or None when they are not."""
        left = self._probes_paused_until - trio.current_time()
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
        members: tuple[GroupPlan, str] | None = None,
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
        self._xid_events: collections.deque[XidSeen] = collections.deque(maxlen=64)
        self.all_ready = trio.Event()  # set once, when every rank is first ready
        self.stopping = trio.Event()  # set once, when shutdown or a failure begins
        #: The group across nodes this is a member of ((its plan, this node's name) given).
        self.members = (
            None if members is None else GroupView(members[0], run_id, members[1], self._bump)
        )

    @property
    def state(self) -> SupervisorState:
        return self._state

    def _enter(self, state: SupervisorState) -> None:
        if state is not self._state:
            self._state = state
            self._bump()

    def finish(self) -> None:
        """Every rank is stopped: STOPPED."""
        self._enter(SupervisorState.STOPPED)

    def note_xid(self, seen: XidSeen) -> None:
        """An Xid event NVML reported."""
        self._xid_events.append(seen)

    @property
    def xid_events(self) -> tuple[XidSeen, ...]:
        """The Xid events NVML reported (at most 64), newest last."""
        return tuple(self._xid_events)

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
        record._enter(RankState.READY)  # the board's verb: it knows the other ranks
        if self.started or any(r.state is not RankState.READY for r in self.ranks):
            return False
        self.started = True
        self.ready_at = trio.current_time()
        if self.state is SupervisorState.STARTING:
            self._enter(SupervisorState.READY)
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
        self._enter(state)
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
        status = self._local_snapshot()
        if self.members is None:
            return status
        return dataclasses.replace(status, members=self.members.snapshot(status))

    def _local_snapshot(self) -> SupervisorStatus:
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
