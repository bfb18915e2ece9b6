"""The supervisor: the nurseries whose structure is the shutdown order.

    run()                              root nursery
    ├── control plane (h11)            started first, stopped last
    ├── guardian process               kills the rank trees if the supervisor dies; told
    │                                  of each rank process and tree member as they come
    └── ranks nursery                  cancelled on shutdown or on the first failure
        ├── shutdown watcher           started first: drain delay, then cancels the nursery
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

import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import httpx
import trio

from ._config.config import SupervisorConfig
from ._config.enums import LogFormat
from ._config.options import option_name
from ._config.plan import plan_ranks
from ._config.tls import TlsFiles, check_tls
from ._errors import EXIT_FAILURE, ConfigError, GpuLeftovers, SupervisorFailure, SupervisorStopped
from ._gpu.holders import find_leftovers
from ._gpu.nvml import GpuInfo, NvmlBackend, NvmlError, NvmlFactory, NvmlUnavailable, open_pynvml
from ._gpu.placement import Owner, OwnerKind, Placement, PlacementVerdict, owner_from_trees
from ._output.log_files import RankFiles, open_log_dir
from ._output.pump import LogFiles, LogPump, open_log_pump
from ._plane.admin import Admin, AdminSocket, bind_admin_socket, serve_admin
from ._plane.control import ControlApp, bind_control_socket, serve_control_plane
from ._plane.metrics import Metrics
from ._proc.cgroup import CgroupError, RunCgroups
from ._proc.guardian import Guardian, open_guardian
from ._proc.membership import Trees
from ._proc.process_tree import TreeScanner, process_of, run_tree_watch, signal_all, wait_gone
from ._proc.spawn import open_spawner
from ._proc.stop import StopClock
from ._ranks.clean_start import check_gpus_at_start, check_ports_at_start
from ._ranks.gpu_watch import run_gpu_monitor
from ._ranks.prober import (
    Ticker,
    log_startup_progress,
    open_probe_client,
    probe_factory,
    run_startup_deadline,
)
from ._ranks.rank import RankContext, run_rank
from ._ranks.restart import Restarter
from ._state.board import Board
from ._state.document import status_to_json
from ._state.status import SupervisorState, SupervisorStatus

__all__ = ["Supervisor", "SupervisorHandle"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Nvml:
    """NVML, open, and the devices it sees."""

    backend: NvmlBackend
    inventory: tuple[GpuInfo, ...]


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
        backend, inventory, problem = await _open_nvml(self._nvml)
        gpu = None if backend is None or inventory is None else _Nvml(backend, inventory)
        # What is made before the run exists is undone here if a later step refuses.
        with contextlib.ExitStack() as undo:
            try:
                plans = plan_ranks(self.config, self._environ, inventory, nvml_problem=problem)
                # Nothing of this run exists yet: every holder of a port or a GPU is foreign.
                check_ports_at_start(plans, self.config.host, _nobody_of_ours)
                if gpu is not None:
                    await check_gpus_at_start(self.config, gpu.backend, plans, _nobody_of_ours)
                check_tls(self.config)
                # Before anything listens: a log directory that is unsafe or cannot be made
                # is bad input (exit 2), not a failure after the control plane answered.
                log_dir = _open_log_dir(self.config)
                if log_dir is not None:
                    undo.callback(os.close, log_dir)
                run_id = uuid.uuid4().hex
                cgroups = _make_cgroups(run_id) if self.config.cgroups else None
                if cgroups is not None:
                    undo.callback(cgroups.remove)
                sock = bind_control_socket(self.config.control_host, self.config.control_port)
                undo.callback(sock.close)
                admin_sock = None
                if self.config.admin_socket is not None:
                    admin_sock = bind_admin_socket(self.config.admin_socket)
                    undo.callback(admin_sock.remove)
                    undo.callback(admin_sock.sock.close)
            except BaseException:
                await _close_nvml(gpu)
                raise
            undo.pop_all()  # the run owns them now
        for plan in plans:
            logger.info("rank %d command: %s", plan.rank, shlex.join(plan.redacted_argv))
        # Names the run in /status and marks every process of its trees (see _proc/cookie.py).
        board = Board(
            plans,
            run_id,
            nvml_unavailable=problem,
            min_ready=self.config.min_ready,
            group=self.config.forms_group,
        )
        trees = Trees(run_id, adopter=os.getpid() if self._subreaper else None)
        if cgroups is not None:
            trees.use_cgroups()
        self._run = run = _Run(
            self.config, board, self._environ, self._transport, gpu, trees, cgroups, log_dir
        )
        if self._early is not None:
            signum, kill = self._early
            run.request_shutdown(signum)
            if kill:
                run.kill()
        await run.run(sock, admin_sock, task_status)  # it closes NVML before it reports stopped


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
        await _first_of(board.all_ready, board.stopping)
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
        board: Board,
        environ: dict[str, str],
        transport: httpx.AsyncBaseTransport | None,
        gpu: _Nvml | None,
        trees: Trees,
        cgroups: RunCgroups | None,
        log_dir: int | None,
    ) -> None:
        self.config = config
        #: The descriptor of --log-dir, checked; the log pump owns it once it starts.
        self.log_dir = log_dir
        self.board = board
        #: NVML and the devices it sees; None when it is unavailable.
        self.gpu = gpu
        self.environ = environ
        self.transport = transport
        self.clock = StopClock(config.grace_period)
        self.metrics = Metrics(board)
        self.scanner = TreeScanner(trees)
        self.trees = trees
        self.cgroups = cgroups
        self.shutdown_requested = trio.Event()
        self.stopped = trio.Event()
        self.exit_status: int | None = None
        self._drain_scope = trio.CancelScope()
        self._ranks_scope: trio.CancelScope | None = None
        self._handed_out = False

    async def run(
        self,
        sock: socket.socket,
        admin_sock: AdminSocket | None,
        task_status: trio.TaskStatus[SupervisorHandle],
    ) -> None:
        stop_control = trio.Event()
        admin_scope = trio.CancelScope()
        try:
            async with trio.open_nursery() as root:
                app = ControlApp(
                    self.board.snapshot,
                    self.metrics.render,
                    config=self.config,
                    changed=lambda: self.board.changed,
                )
                serve = partial(serve_control_plane, tls=TlsFiles.of(self.config))
                url: str = await root.start(serve, app, sock, stop_control.wait)
                logger.info("control plane listening on %s", url)
                if admin_sock is not None:
                    admin = Admin(self.config, self.board, self.metrics.count_action)
                    await root.start(self._serve_admin, admin_sock, admin, admin_scope)
                make_handle = partial(SupervisorHandle, self, url)
                try:
                    async with open_guardian(self.board.run_id) as guardian:
                        self.trees.exclude.add(guardian.pid)
                        await self._run_ranks(guardian, make_handle, task_status)
                        await self._sweep()
                    # After the guardian's last sweep: what is left now outlived everything.
                    await self._report_leftovers()
                finally:
                    if self.cgroups is not None:
                        self.cgroups.remove()
                    admin_scope.cancel()
                    stop_control.set()  # the control plane stops last, after every rank is gone
                if not self._handed_out and self.board.failure is None:
                    # Shutdown was requested while ranks were being started: hand out the
                    # handle now, to a caller who will find it stopped.
                    task_status.started(make_handle())
        finally:
            await _close_nvml(self.gpu)
            self._finish()
        if self.board.failure is not None:
            raise self.board.failure

    async def _serve_admin(
        self,
        admin_sock: AdminSocket,
        admin: Admin,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The admin socket until `scope` is cancelled (with the control plane); then its
        file is removed, if it is still ours."""
        try:
            with scope:
                logger.info("admin socket listening on %s", admin_sock.path)
                await serve_admin(admin_sock, admin, task_status=task_status)
        finally:
            admin_sock.remove()

    async def _run_ranks(
        self,
        guardian: Guardian,
        make_handle: partial[SupervisorHandle],
        task_status: trio.TaskStatus[SupervisorHandle],
    ) -> None:
        config = self.config
        async with (
            open_spawner() as spawner,
            _log_pump(config, self.log_dir) as pump,
            open_probe_client(config, self.transport) as client,
        ):
            ticker = Ticker(config.probe_interval)
            ctx = RankContext(
                config=config,
                board=self.board,
                spawner=spawner,
                scanner=self.scanner,
                guardian=guardian,
                cgroups=self.cgroups,
                clock=self.clock,
                client=client,
                probes=probe_factory(config, client, through_httpx=self.transport is not None),
                ticker=ticker,
                restarter=_restarter(config),
                environ=self.environ,
                fail=self.fail,
                owner=owner_from_trees(self.trees),
                nvml=None if self.gpu is None else self.gpu.backend,
                observe=self.metrics.observe_probe,
                pump=pump,
            )
            try:
                async with trio.open_nursery() as ranks:
                    self._ranks_scope = ranks.cancel_scope
                    # First: a shutdown requested while ranks start stops the starting.
                    ranks.start_soon(self._watch_shutdown)
                    await ranks.start(ticker.run)
                    await ranks.start(
                        partial(
                            run_tree_watch,
                            self.trees,
                            guardian.seen,
                            spawner,
                            interval=config.tree_watch_interval,
                        )
                    )
                    for record in self.board.ranks:
                        await ranks.start(run_rank, record, ctx)
                    ranks.start_soon(run_startup_deadline, config, self.board, self.fail)
                    ranks.start_soon(log_startup_progress, config, self.board)
                    await self._start_gpu_monitor(ranks)
                    self._handed_out = True
                    task_status.started(make_handle())
            except BaseExceptionGroup as group:
                # Failures are on the board already (a task that raised one without recording
                # it gets it recorded here, so it is never mistaken for a clean stop); an
                # outer cancellation is re-delivered by Trio at the next checkpoint; anything
                # else is a bug to surface.
                failures, rest = group.split(SupervisorFailure)
                if failures is not None and self.board.failure is None:
                    self.fail(_first_failure(failures))
                if rest is not None and rest.split(trio.Cancelled)[1] is not None:
                    raise

    async def _start_gpu_monitor(self, nursery: trio.Nursery) -> None:
        if self.gpu is not None:
            await nursery.start(
                partial(
                    run_gpu_monitor,
                    self.gpu.backend,
                    self.gpu.inventory,
                    self.board,
                    interval=self.config.gpu_interval,
                    fail=self.fail,
                    owner=owner_from_trees(self.trees),
                )
            )
            return
        unavailable = Placement(PlacementVerdict.UNAVAILABLE, note=self.board.nvml_unavailable)
        for record in self.board.ranks:
            record.placement = unavailable
        if any(record.plan.devices for record in self.board.ranks):
            logger.warning(
                "NVML is unavailable (%s): no GPU readings, placement checks, GPU fault "
                "detection or leftover report",
                self.board.nvml_unavailable,
            )

    async def _report_leftovers(self) -> None:
        gpus = [gpu for record in self.board.ranks for gpu in record.plan.gpus]
        if self.gpu is None or not gpus:
            return
        with trio.CancelScope(shield=True):
            owner = owner_from_trees(self.trees)
            leftovers = await find_leftovers(self.gpu.backend, gpus, owner)
        for holder in leftovers:
            logger.error("left over after shutdown: %s", holder.describe())
        if leftovers and self.config.fail_on_leftovers and self.board.failure is None:
            self.board.fail(GpuLeftovers(tuple(leftovers)))

    async def _sweep(self) -> None:
        """Stop the orphans this subreaper adopted from the trees whose rank could not be
        told (no rank's stop took them: a setsid, double-forked, renamed process). They get
        the forwarded signal and what is left of the shared grace period, then kill passes.

        **Cancellation**: shielded; bounded by the grace deadline and the kill passes.
        """
        with trio.CancelScope(shield=True):
            orphans = [stat for stat, _ in self.trees.adopted()]
            if not orphans:
                return
            logger.warning(
                "stopping pids %s: orphans adopted from the rank trees",
                ", ".join(str(stat.pid) for stat in orphans),
            )
            procs = [proc for stat in orphans if (proc := process_of(stat)) is not None]
            signal_all(procs, self.clock.signum)
            with self.clock.grace():
                await wait_gone(procs)
            await self.scanner.kill_members(None)

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
        # Drain only a supervisor that was serving: while starting, nobody routes to it yet.
        if self.board.state is SupervisorState.READY and self.config.drain_delay > 0:
            self.board.begin_stopping(SupervisorState.DRAINING)
            logger.info("draining for %gs before stopping ranks", self.config.drain_delay)
            with self._drain_scope:
                await trio.sleep(self.config.drain_delay)
        self.board.begin_stopping(SupervisorState.STOPPING)
        assert self._ranks_scope is not None
        self._ranks_scope.cancel()

    def _finish(self) -> None:
        self.board.state = SupervisorState.STOPPED
        killed = [r.plan.rank for r in self.board.ranks if r.killed]
        if self.board.failure is not None:
            self.exit_status = self.board.failure.exit_status
            cause = self.board.root_cause()
            assert cause is not None
            # One record: the cause and the failing rank's last words, after every pump
            # has drained, so that they are complete.
            logger.error("stopped after a failure: %s", cause.report(), extra={"rank": cause.rank})
        elif killed:
            self.exit_status = EXIT_FAILURE
            when = (
                "at once: a kill was requested (a second signal), skipping the grace period"
                if self.clock.killed_now
                else "at the end of the grace period"
            )
            logger.error(
                "stopped, but ranks %s had to be killed %s", ", ".join(map(str, killed)), when
            )
        else:
            self.exit_status = 0
            logger.info("stopped cleanly")
        if self.config.status_file is not None:
            _write_status_file(self.config.status_file, self.board.snapshot())
        self.stopped.set()


def _write_status_file(path: str, status: SupervisorStatus) -> None:
    """Replace `path` with the /status document, atomically: a reader sees the old file or
    the whole new one. A write error is logged; it must not change how the run ended."""
    body = json.dumps(status_to_json(status), indent=2) + "\n"
    partial_path = f"{path}.{os.getpid()}.tmp"
    try:
        # 0640: it holds the ranks' last stderr lines. O_EXCL and O_NOFOLLOW: a file or link
        # planted at the temporary name is refused, never written through.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial_path)  # left by a crashed run of this pid (unlink: not followed)
        with open(os.open(partial_path, flags, 0o640), "w") as f:
            f.write(body)
        os.replace(partial_path, path)
    except OSError as exc:
        logger.error("cannot write --status-file %s: %s", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(partial_path)


def _first_failure(group: BaseExceptionGroup[SupervisorFailure]) -> SupervisorFailure:
    first = group.exceptions[0]
    return first if isinstance(first, SupervisorFailure) else _first_failure(first)


def _nobody_of_ours(pid: int) -> Owner:
    return Owner(OwnerKind.OUTSIDE)


async def _first_of(*events: trio.Event) -> None:
    """Return as soon as any of `events` is set."""
    async with trio.open_nursery() as nursery:

        async def wait_and_cancel(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait_and_cancel, event)


async def _open_nvml(
    factory: NvmlFactory,
) -> tuple[NvmlBackend | None, tuple[GpuInfo, ...] | None, str | None]:
    """The backend and what devices it sees, or None, None and the reason NVML is
    unavailable. In threads: NVML blocks."""
    try:
        backend = await trio.to_thread.run_sync(factory)
    except NvmlUnavailable as exc:
        logger.debug("NVML is unavailable: %s", exc)
        return None, None, str(exc)
    try:
        return backend, await trio.to_thread.run_sync(backend.inventory), None
    except NvmlError as exc:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(backend.close)
        logger.warning("NVML is unavailable: %s", exc)
        return None, None, str(exc)


async def _close_nvml(gpu: _Nvml | None) -> None:
    """**Cancellation**: shielded; waits for an abandoned Xid wait (half a second at most)."""
    if gpu is not None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(gpu.backend.close)


def _open_log_dir(config: SupervisorConfig) -> int | None:
    """The checked --log-dir's descriptor, when ranks' lines are relayed to files."""
    if config.log_dir is None:  # (the config refuses it without the log prefix)
        return None
    return open_log_dir(config.log_dir, option_name(SupervisorConfig, "log_dir"))


@asynccontextmanager
async def _log_pump(config: SupervisorConfig, log_dir: int | None) -> AsyncIterator[LogPump | None]:
    """The log pump when ranks' output is relayed; None when they inherit ours. It takes
    `log_dir` (the checked --log-dir's descriptor) over."""
    if not config.log_prefix:
        yield None
        return
    files = None
    if config.log_dir is not None and log_dir is not None:
        where = LogFiles(config.log_dir, config.log_max_bytes, config.log_backups)
        files = RankFiles(where, log_dir)
    json_lines = config.log_format is LogFormat.JSON
    async with open_log_pump(json_lines=json_lines, files=files) as pump:
        yield pump


def _make_cgroups(run_id: str) -> RunCgroups:
    try:
        return RunCgroups.create(run_id)
    except CgroupError as exc:
        raise ConfigError(
            f"--cgroups needs a writable cgroup v2 hierarchy, and {exc}: run under systemd "
            "with Delegate=yes, in a privileged container, or without --cgroups"
        ) from exc


def _restarter(config: SupervisorConfig) -> Restarter:
    return Restarter(
        config.restart,
        config.scope,
        max_restarts=config.max_restarts,
        window=config.restart_window,
        backoff_min=config.restart_backoff_min,
        backoff_max=config.restart_backoff_max,
    )
