"""The supervisor: the nurseries whose structure is the shutdown order.

    run()                              root nursery
    ├── control plane (h11)            started first, stopped last
    ├── group watch (across nodes)     asks the other members, times their silence; the
    │                                  control plane answers theirs; lingers until each
    │                                  has this member's last state, then stops with it
    ├── router feed (--router)         each router lists the serving ranks; empties them last
    ├── guardian process               kills the rank trees if the supervisor dies; told
    │                                  of each rank process and tree member as they come
    └── ranks nursery                  cancelled on shutdown or on the first failure
        ├── shutdown watcher           started first: drains the serving ranks (each in
        │                              its own task), then cancels the nursery
        ├── tree watch                 records tree members for the guardian; reaps orphans
        ├── one task per rank          owns its process: spawn, its probe loop, stop, restart
        ├── startup deadline           every rank ready in time, or StartupTimeout
        └── GPU monitor (with NVML)    readings, placement, GPU faults
    then: the sweep of adopted orphans, the guardian's last pass, the leftover report

A failure is an exception raised by the task that saw it. Before raising, that task records
it on the board (the first one wins) and cancels the ranks nursery, so /ready answers 503 and
every other rank is signalled in the same scheduler tick.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

import httpx
import trio

from ._config.concerns import (
    AdminSettings,
    PeerSettings,
    ProbeSettings,
    PublishSettings,
    RankSettings,
    derive,
)
from ._config.config import SupervisorConfig
from ._config.tls import TlsFiles
from ._errors import SupervisorFailure, SupervisorStopped, first_failure
from ._gpu.nvml import NvmlFactory, open_pynvml
from ._plane.admin import Admin
from ._plane.admin_socket import serve_admin
from ._plane.control import ControlApp, serve_control_plane
from ._plane.metrics import Metrics
from ._plane.outcome import report_outcome
from ._plane.peers import GroupMember
from ._plane.routers import feed_routers
from ._prepare import RunParts, prepare_run
from ._proc.guardian import Guardian, open_guardian
from ._proc.owners import owner_from_trees
from ._proc.process_tree import TreeScanner, run_tree_watch
from ._proc.stop import StopClock, sweep_orphans
from ._ranks.context import open_rank_context
from ._ranks.gpu_watch import report_leftovers, run_gpu_watch
from ._ranks.prober import Ticker, log_startup_progress, run_startup_deadline
from ._ranks.rank import run_rank
from ._state.board import RankRecord
from ._state.status import DrainReason, RankState, SupervisorState, SupervisorStatus

__all__ = ["Supervisor", "SupervisorHandle"]

logger = logging.getLogger(__name__)


class Supervisor:
    """Runs one supervisor from a `SupervisorConfig`. Start it with ``nursery.start``::

        handle = await nursery.start(Supervisor(config).run)
        await handle.wait_ready()

    `environ` is the environment ranks inherit and the one CUDA_VISIBLE_DEVICES and PATH are
    read from (default: os.environ). `transport` replaces the prober's HTTP transport.
    `subreaper` says that this process is a child subreaper (the CLI makes itself one):
    every child it did not start is then an orphan of the rank trees, counted as theirs and
    reaped. Signals are the caller's business: the library installs no signal handler, but
    `request_shutdown` and `kill` work at any time, also while ranks are being started.
    """

    def __init__(
        self,
        config: SupervisorConfig,
        *,
        environ: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        nvml: NvmlFactory = open_pynvml,
        subreaper: bool = False,
    ) -> None:
        self.config = config
        self._environ = dict(os.environ if environ is None else environ)
        self._transport = transport
        self._nvml = nvml
        self._subreaper = subreaper
        self._run: _Run | None = None
        #: A shutdown asked for before the run existed: (signal, kill).
        self._early: tuple[int, bool] | None = None

    def request_shutdown(self, signum: int = signal.SIGTERM) -> None:
        """Begin the ordered shutdown, forwarding `signum` to the ranks. Idempotent.

        Also before or while `run` starts the ranks: no further rank is started, those
        already started are stopped in order, and `run` returns normally.
        """
        if self._run is not None:
            self._run.request_shutdown(signum)
        elif self._early is None:
            self._early = (signum, False)

    def kill(self) -> None:
        """Skip the drain delay and the rest of the grace period: SIGKILL every rank now."""
        if self._run is not None:
            self._run.kill()
        else:
            self._early = (self._early or (signal.SIGTERM, True))[0], True

    async def run(
        self, *, task_status: trio.TaskStatus[SupervisorHandle] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Supervise the ranks until a shutdown request or the first failure.

        ``task_status.started(handle)`` comes once the control plane listens and every rank
        process exists. Raises ConfigError (nothing started) for bad input or a taken control
        port, and the first `SupervisorFailure` after a failure, once everything is stopped.
        Returns normally after a requested shutdown; `SupervisorHandle.exit_status` then says
        whether every rank stopped within the grace period.

        **Cancellation**: every rank is stopped (signal, grace, tree kill) before this
        returns; the stop is shielded and bounded by the grace period plus a kill timeout.
        """
        parts = await prepare_run(self.config, self._environ, self._nvml, subreaper=self._subreaper)
        self._run = run = _Run(self.config, parts, self._environ, self._transport)
        if self._early is not None:
            signum, kill = self._early
            run.request_shutdown(signum)
            if kill:
                run.kill()
        await run.run(task_status)


class SupervisorHandle:
    """What ``nursery.start(supervisor.run)`` returns: readiness, state, shutdown."""

    def __init__(self, run: _Run, control_url: str) -> None:
        self._run = run
        #: Where the control plane listens, e.g. ``http://127.0.0.1:9000``.
        self.control_url = control_url

    def status(self) -> SupervisorStatus:
        """A snapshot of the supervisor's and every rank's state."""
        return self._run.board.snapshot()

    async def wait_ready(self) -> None:
        """Return once every rank is ready.

        Raises SupervisorStopped if shutdown began first (its `failure` says why; the
        failure itself is raised by `run`).

        **Cancellation**: safe; nothing changes.
        """
        board = self._run.board
        await board.wait_settled()
        if board.state is not SupervisorState.READY:
            raise SupervisorStopped(board.failure) from board.failure

    async def wait_changed(self) -> None:
        """Return at the next change of the supervisor's or a rank's state (the change
        /ranks long polls wait for); then read `status`.

        **Cancellation**: safe; nothing changes.
        """
        await self._run.board.changed.wait()

    async def wait_stopping(self) -> None:
        """Return once shutdown or a failure has begun (/ready answers 503 from then on).

        **Cancellation**: safe; nothing changes.
        """
        await self._run.board.stopping.wait()

    def request_shutdown(self, signum: int = signal.SIGTERM) -> None:
        """Begin the ordered shutdown, forwarding `signum` to the ranks. Idempotent."""
        self._run.request_shutdown(signum)

    def kill(self) -> None:
        """Skip the drain delay and the rest of the grace period: SIGKILL every rank now."""
        self._run.kill()

    async def wait_stopped(self) -> int:
        """Wait until the supervisor has stopped; return its exit status (0: clean).

        **Cancellation**: safe; nothing changes.
        """
        await self._run.stopped.wait()
        assert self._run.exit_status is not None
        return self._run.exit_status

    @property
    def exit_status(self) -> int | None:
        """None while running; then 0, or the failure's exit status, or 1 when a rank had
        to be killed at the end of the grace period."""
        return self._run.exit_status


class _Run:
    """The state of one call to `Supervisor.run`."""

    def __init__(
        self,
        config: SupervisorConfig,
        parts: RunParts,
        environ: dict[str, str],
        transport: httpx.AsyncBaseTransport | None,
    ) -> None:
        self.config = config
        self.parts = parts
        self.board = board = parts.board
        self.gpu = parts.gpu
        self.trees = parts.trees
        self.environ = environ
        self.transport = transport
        self.clock = StopClock(config.grace_period)
        self.metrics = Metrics(board)
        self.scanner = TreeScanner(parts.trees)
        self.shutdown_requested = trio.Event()
        self.stopped = trio.Event()
        self.exit_status: int | None = None
        self._drain_scope = trio.CancelScope()
        self._ranks_scope: trio.CancelScope | None = None
        self._handed_out = False

    async def run(self, task_status: trio.TaskStatus[SupervisorHandle]) -> None:
        stop_control = trio.Event()
        try:
            async with trio.open_nursery() as root:
                publish = derive(PublishSettings, self.config)
                group = None
                if self.board.members is not None:
                    group = GroupMember(
                        derive(PeerSettings, self.config),
                        self.board,
                        self.fail,
                        partial(self.request_shutdown, signal.SIGTERM),
                    )
                app = ControlApp(self.board, self.metrics.render, publish, group)
                serve = partial(serve_control_plane, tls=TlsFiles.of(self.config))
                url: str = await root.start(serve, app, self.parts.control_sock, stop_control.wait)
                logger.info("control plane listening on %s", url)
                if self.parts.admin_sock is not None:
                    admin = Admin(
                        derive(AdminSettings, self.config), self.board, self.metrics.count_action
                    )
                    await root.start(serve_admin, self.parts.admin_sock, admin, stop_control.wait)
                    logger.info("admin socket listening on %s", self.parts.admin_sock.path)
                # The routers are fed from the board: out the moment a rank leaves traffic,
                # and every rank out of them once the ranks are gone (stop_control).
                root.start_soon(feed_routers, publish, self.board, stop_control.wait)
                if group is not None:
                    root.start_soon(_until, stop_control.wait, group.run)
                make_handle = partial(SupervisorHandle, self, url)
                try:
                    async with open_guardian(self.board.run_id) as guardian:
                        self.trees.exclude.add(guardian.pid)
                        await self._run_ranks(guardian, make_handle, task_status)
                        await sweep_orphans(self.trees, self.scanner, self.clock)
                    # After the guardian's last sweep: what is left now outlived everything.
                    await report_leftovers(
                        self.gpu,
                        self.board,
                        owner_from_trees(self.trees),
                        fail=self.config.fail_on_leftovers,
                    )
                finally:
                    if group is not None:
                        with trio.CancelScope(shield=True):  # bounded: peers.LINGER
                            await group.linger()
                    stop_control.set()  # the control plane stops last, after every rank is gone
                if not self._handed_out and self.board.failure is None:
                    # Shutdown was requested while ranks were being started: hand out the
                    # handle now, to a caller who will find it stopped.
                    task_status.started(make_handle())
        finally:
            await self.parts.aclose()  # NVML closes before the run reports itself stopped
            self.exit_status = report_outcome(
                self.board, killed_now=self.clock.killed_now, status_file=self.config.status_file
            )
            self.stopped.set()
        if self.board.failure is not None:
            raise self.board.failure

    async def _run_ranks(
        self,
        guardian: Guardian,
        make_handle: partial[SupervisorHandle],
        task_status: trio.TaskStatus[SupervisorHandle],
    ) -> None:
        config = self.config
        async with open_rank_context(
            derive(RankSettings, config),
            self.board,
            trees=self.trees,
            scanner=self.scanner,
            guardian=guardian,
            clock=self.clock,
            environ=self.environ,
            fail=self.fail,
            nvml=None if self.gpu is None else self.gpu.backend,
            cgroups=self.parts.cgroups,
            log_dir=self.parts.log_dir,
            evidence_dir=self.parts.evidence_dir,
            transport=self.transport,
            observe=self.metrics.observe_probe,
            observe_canary=self.metrics.observe_canary,
        ) as ctx:
            try:
                async with trio.open_nursery() as ranks:
                    self._ranks_scope = ranks.cancel_scope
                    # First: a shutdown requested while ranks start stops the starting.
                    ranks.start_soon(self._watch_shutdown)
                    await ranks.start(ctx.ticker.run)
                    await ranks.start(ctx.readings.run)
                    walks = Ticker(config.tree_watch_interval, ctx.ticker)
                    await ranks.start(walks.run)
                    await ranks.start(
                        run_tree_watch, self.trees, guardian.seen, ctx.spawner, walks.wait
                    )
                    for record in self.board.ranks:
                        await ranks.start(run_rank, record, ctx)
                    probes = derive(ProbeSettings, config)
                    ranks.start_soon(run_startup_deadline, probes, self.board, self.fail)
                    ranks.start_soon(log_startup_progress, probes, self.board)
                    await ranks.start(run_gpu_watch, self.gpu, ctx)
                    self._handed_out = True
                    task_status.started(make_handle())
            except BaseExceptionGroup as group:
                # Failures are on the board already (a task that raised one without recording
                # it gets it recorded here, so it is never mistaken for a clean stop); an
                # outer cancellation is re-delivered by Trio at the next checkpoint; anything
                # else is a bug to surface.
                failures, rest = group.split(SupervisorFailure)
                if failures is not None and self.board.failure is None:
                    self.fail(first_failure(failures))
                if rest is not None and rest.split(trio.Cancelled)[1] is not None:
                    raise

    def fail(self, failure: SupervisorFailure) -> SupervisorFailure:
        """Record `failure` (the first one wins) and start stopping every rank at once."""
        self.board.fail(failure)
        self._drain_scope.cancel()
        if self._ranks_scope is not None:
            self._ranks_scope.cancel()
        return failure

    def request_shutdown(self, signum: int) -> None:
        if self.shutdown_requested.is_set():
            return
        logger.info("shutdown requested (%s)", signal.Signals(signum).name)
        self.clock.signum = signum
        self.shutdown_requested.set()

    def kill(self) -> None:
        logger.warning("kill requested: skipping the rest of the drain and grace periods")
        self.clock.kill_now()
        self._drain_scope.cancel()
        self.shutdown_requested.set()

    async def _watch_shutdown(self) -> None:
        await self.shutdown_requested.wait()
        # Drain the ranks that serve (while starting, nobody routes to a rank yet), all at
        # once, each in its own task: out of /ranks and every router, the delay, its
        # in-flight requests to zero (_ranks/drain.py). Ranks an operator drained are out.
        serving = [r for r in self.board.ranks if r.serving]
        # A rank already draining (for a restart, or an operator's drain) finishes its drain
        # too; one drained for a restart is then not restarted (see _ranks/rank.py).
        draining = [r for r in self.board.ranks if r.drain is not None and r.drain.end is None]
        waited = serving + draining
        if waited and not self._drain_scope.cancel_called:
            self.board.begin_stopping(SupervisorState.DRAINING)
            logger.info(
                "draining ranks %s before stopping them (--drain-delay %gs, --drain-timeout %gs)",
                ", ".join(str(r.plan.rank) for r in sorted(waited, key=lambda r: r.plan.rank)),
                self.config.drain_delay,
                self.config.drain_timeout,
            )
            for record in serving:
                record.request_drain(DrainReason.SHUTDOWN)

            def drained() -> bool:
                return all(r.state is not RankState.READY or _drain_ended(r) for r in waited)

            with self._drain_scope:  # a second signal, or a failure, ends the wait
                while not drained():
                    await self.board.changed.wait()
        self.board.begin_stopping(SupervisorState.STOPPING)
        assert self._ranks_scope is not None
        self._ranks_scope.cancel()


async def _until(
    trigger: Callable[[], Awaitable[object]], task: Callable[[], Awaitable[object]]
) -> None:
    """Run `task` until `trigger` returns."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(task)
        await trigger()
        nursery.cancel_scope.cancel()


def _drain_ended(record: RankRecord) -> bool:
    return record.drain is not None and record.drain.end is not None
