"""The failure-injection harness: supervisors of fake ranks, faults, and a leftover check.

`Harness.start` runs a supervisor in either form — the CLI as a subprocess, or the library
in this process — and returns a `Deployment`: the same methods and the same types for both
(`SupervisorStatus`, `SupervisorFailure`), so one test can cover both forms. The harness
owns every deployment it started: on `Harness.close` (the pytest fixture and `open_harness`
call it) each one still running is shut down, and every process of its tree must be gone,
or the test fails with the survivors named (and killed, so they cannot leak into the next
test).

Waits take no timeouts: bound them with ``trio.fail_after``, as any Trio call. A wait
called with no deadline at all is bounded by `WAIT_TIMEOUT` instead, so a forgotten bound
fails, naming what it waited for, and never hangs a test run. A wait wakes on each change
the supervisor announces (the library's `SupervisorHandle.wait_changed`, the CLI's /ranks
long poll), and re-reads at least every `REREAD` seconds for what no change announces (a
probe's latency, a GPU reading).
"""

from __future__ import annotations

import abc
import contextlib
import enum
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from .._config.config import SupervisorConfig
from .._config.options import cli_arguments
from .._errors import SupervisorFailure
from .._gpu.nvml import NvmlFactory
from .._proc import cookie as _cookie
from .._proc.stop import SECOND_SIGNAL_AFTER
from .._state.document import status_from_json
from .._state.status import RankState, RankStatus, SupervisorState, SupervisorStatus
from .._supervisor import Supervisor, SupervisorHandle
from ._cli_process import WAIT_TIMEOUT, CliSupervisor, default_bound, open_cli_supervisor
from ._ports import free_port_range
from ._procs import alive, wait_pids_gone
from .faults import Fault, FaultKind

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's own from Python 3.12

    from ._settings import SupervisorSettings

__all__ = [
    "FAKE_RANK",
    "FAST_SETTINGS",
    "Deployment",
    "Form",
    "Harness",
    "LeftoverProcesses",
    "NeedsFakeRank",
    "ProcessTree",
    "cli_options",
    "open_harness",
]

#: The fake rank's command; `Harness.start` appends ``--port {port}`` and the rank args.
FAKE_RANK = (sys.executable, "-m", "trio_dpsup.testing.fake_rank")

#: Settings that make faults show within a second, unless a test chooses its own.
FAST_SETTINGS: SupervisorSettings = {
    "probe_interval": 0.1,
    "probe_timeout": 0.5,
    "failure_threshold": 2,
    "grace_period": 5.0,
    "startup_timeout": 60.0,
    # Fake ranks need no GPU; on a GPU machine, tests must not claim (or lack) devices.
    "gpus_per_rank": 0,
}

#: The longest a wait goes without reading the status again: for changes that no version
#: counts (a probe's latency, a GPU reading). Announced changes wake it at once.
REREAD = 0.25
#: How long the leftover check gives a tree to finish exiting, by default.
_LEFTOVER_GRACE = 5.0


class Form(enum.Enum):
    """How the supervisor runs: as its users run it."""

    CLI = "cli"  # python -m trio_dpsup, a subprocess
    LIBRARY = "library"  # Supervisor.run, in this process's Trio run


class LeftoverProcesses(AssertionError):
    """Processes of a supervised tree outlived their supervisor (they have been killed)."""


class NeedsFakeRank(TypeError):
    """A fault that only the fake rank can inject, asked of a deployment of another command."""


@dataclass(frozen=True)
class ProcessTree:
    """Every live process of one deployment, by role."""

    #: The CLI supervisor's pid; None for the library form (it is this process).
    supervisor: int | None
    guardian: tuple[int, ...]
    #: Rank number -> the rank's process and every descendant (setsid, double-forked...).
    ranks: Mapping[int, tuple[int, ...]]

    def pids(self) -> set[int]:
        """All of them."""
        everything = {*self.guardian, *(p for tree in self.ranks.values() for p in tree)}
        return everything | ({self.supervisor} if self.supervisor is not None else set())


class Deployment(abc.ABC):
    """One running supervisor, in either form.

    Faults go to a rank's fake server over HTTP, signals go to its pid from /status, and
    waits read /status until a condition holds.
    """

    def __init__(
        self, form: Form, control_url: str, ports: tuple[int, ...], *, fake_rank: bool
    ) -> None:
        self.form = form
        #: Where the control plane listens.
        self.control_url = control_url
        #: Each local rank's port, in rank order.
        self.ports = ports
        #: The ranks run the fake rank, which takes faults over HTTP.
        self.fake_rank = fake_rank
        self.run_id = ""  # set by `_attach`, from the first /status
        #: When `signal_supervisor` was first called (Trio's clock).
        self._signalled_at: float | None = None
        self._client = httpx.AsyncClient(trust_env=False, timeout=5.0)
        self._seen: set[int] = set()

    # -- reading the control plane --------------------------------------------------------

    @abc.abstractmethod
    async def status(self) -> SupervisorStatus:
        """The supervisor's status now: the library's snapshot, or /status parsed (CLI)."""

    async def status_document(self) -> dict[str, Any]:
        """GET /status as JSON, for tests of the document itself."""
        response = await self._client.get(f"{self.control_url}/status")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def ready_code(self, rank: int | None = None) -> int:
        """What GET /ready (or, given `rank`, /ranks/{rank}/ready) answers now: 200 or 503."""
        path = "/ready" if rank is None else f"/ranks/{rank}/ready"
        return (await self._client.get(f"{self.control_url}{path}")).status_code

    async def wait_for_state(self, state: SupervisorState) -> SupervisorStatus:
        """Wait until the supervisor is in `state`; return that status."""
        return await self.wait_for_status(lambda s: s.state is state, f"state {state.value}")

    async def wait_for_rank_state(self, rank: int, state: RankState) -> RankStatus:
        """Wait until rank `rank` is in `state`; return its status."""
        status = await self.wait_for_status(
            lambda s: _rank_entry(s, rank).state is state, f"rank {rank} {state.value}"
        )
        return _rank_entry(status, rank)

    async def wait_ready(self) -> SupervisorStatus:
        """Wait until every rank is ready; return that status."""
        status = await self.wait_for_state(SupervisorState.READY)
        self.process_tree()  # remember the ranks' pids for the leftover check
        return status

    async def wait_for_status(
        self, condition: Callable[[SupervisorStatus], bool], what: str = "the condition"
    ) -> SupervisorStatus:
        """Wait until `condition` holds for the status; return that status. Where it is
        bounded by `WAIT_TIMEOUT`, fails saying `what` it waited for and the last state
        seen."""
        last: SupervisorStatus | None = None
        try:
            with default_bound():
                while True:  # bounded by the deadline above or the caller's
                    last = await self._status_or_gone(what)
                    if condition(last):
                        return last
                    with trio.move_on_after(REREAD):
                        await self._changed_since(last.version)
        except trio.TooSlowError:
            seen = (
                "nothing" if last is None else f"state {last.state.value}, failure {last.failure}"
            )
            raise AssertionError(f"no {what} within {WAIT_TIMEOUT}s; last seen: {seen}") from None

    @abc.abstractmethod
    async def _changed_since(self, version: int) -> None:
        """Return once the supervisor announced a change after `version`."""

    async def _status_or_gone(self, what: str) -> SupervisorStatus:
        try:
            return await self.status()
        except httpx.TransportError as exc:
            raise AssertionError(
                f"waiting for {what}: the control plane is gone (exit status {self.returncode})"
            ) from exc

    # -- faults ---------------------------------------------------------------------------

    async def inject(self, rank: int, fault: Fault) -> None:
        """Make rank `rank`'s fake server show `fault` (see `FaultKind`). An exit fault
        returns once asked: the rank may die before it answers."""
        if fault.kind is FaultKind.EXIT:
            self.process_tree()
            with contextlib.suppress(httpx.TransportError):
                await self._fault(rank, fault)
            return
        await self._fault(rank, fault)

    async def fail_health(
        self, rank: int, status_code: int = 503, *, count: int | None = None
    ) -> None:
        """Make rank `rank`'s health path answer `status_code` from now on, or for its next
        `count` answers only (fake rank)."""
        await self.inject(rank, Fault.health(status_code, count))

    async def hang_health(self, rank: int) -> None:
        """Make rank `rank`'s health path hang: the probe-timeout path (fake rank)."""
        await self.inject(rank, Fault.hang())

    async def make_busy(self, rank: int, requests: float = 1) -> None:
        """Make rank `rank` report `requests` in flight; its progress counter then moves
        at each read, until it stalls (fake rank)."""
        await self.inject(rank, Fault.busy_with(requests))

    async def stall(self, rank: int) -> None:
        """Make rank `rank` busy with no progress for good: the progress-timeout path (fake
        rank)."""
        await self.inject(rank, Fault.busy_with(1))
        await self.inject(rank, Fault.stall())

    async def fail_metrics(self, rank: int, status_code: int = 500) -> None:
        """Make rank `rank`'s /metrics answer `status_code` (fake rank)."""
        await self.inject(rank, Fault.metrics(status_code))

    async def crash_rank(self, rank: int, code: int = 1) -> None:
        """Make rank `rank` exit at once with `code` (negative: killed by signal ``-code``).
        Any command: the fake rank exits as asked; another command's process gets the
        signal, or SIGKILL for an exit status it cannot be made to return."""
        if not self.fake_rank:
            await self.signal_rank(rank, -code if code < 0 else signal.SIGKILL)
            return
        await self.inject(rank, Fault.exit(code))  # it notes the tree first, as signal_rank

    async def rank_pid(self, rank: int) -> int:
        pid = _rank_entry(await self.status(), rank).pid
        assert pid is not None, f"rank {rank} has no process"
        return pid

    async def signal_rank(self, rank: int, signum: int) -> None:
        """Send `signum` to rank `rank`'s process (not its group)."""
        pid = await self.rank_pid(rank)
        self.process_tree()
        os.kill(pid, signum)

    # -- the supervisor -------------------------------------------------------------------

    @abc.abstractmethod
    def signal_supervisor(self, signum: int) -> None:
        """Send `signum` to the supervisor, as a user or Kubernetes would."""

    async def signal_supervisor_again(self, signum: int) -> None:
        """Send `signum` as a second signal, the request to kill the ranks now: the CLI
        takes a repeat within `SECOND_SIGNAL_AFTER` seconds of the first signal for the
        same request, so in that form this waits out what is left of that window first."""
        assert self._signalled_at is not None, "no first signal: call signal_supervisor"
        if self.form is Form.CLI:  # the library form takes any second signal as one
            await trio.sleep_until(self._signalled_at + SECOND_SIGNAL_AFTER * 2)
        self.signal_supervisor(signum)

    @abc.abstractmethod
    async def wait_exit(self) -> int:
        """Wait for the supervisor to stop; return its exit status."""

    @property
    @abc.abstractmethod
    def returncode(self) -> int | None:
        """The exit status once stopped, else None."""

    async def failure(self) -> SupervisorFailure | None:
        """The failure the supervisor stopped on (or is stopping on), typed as the library
        raises it; None while it has none, and after a clean or requested stop."""
        return (await self.final_status()).failure

    @abc.abstractmethod
    async def final_status(self) -> SupervisorStatus:
        """The status now, or once stopped, the last one (the CLI's ``--status-file``)."""

    def _supervisor_pid(self) -> int | None:
        return None

    # -- the process tree -----------------------------------------------------------------

    def process_tree(self) -> ProcessTree:
        """Every live process of this deployment now, found by the run's tree cookie."""
        guardian: list[int] = []
        ranks: dict[int, list[int]] = {}
        for pid, member in _cookie.marked(self.run_id).items():
            if member == "guardian":
                guardian.append(pid)
            else:
                ranks.setdefault(int(member), []).append(pid)
        supervisor = self._supervisor_pid()
        tree = ProcessTree(
            supervisor=supervisor if supervisor is not None and alive(supervisor) else None,
            guardian=tuple(sorted(guardian)),
            ranks={rank: tuple(sorted(pids)) for rank, pids in sorted(ranks.items())},
        )
        self._seen |= tree.pids()
        return tree

    async def assert_no_leftovers(self, *, grace: float = _LEFTOVER_GRACE) -> None:
        """Give every process this deployment ever had `grace` seconds to finish exiting;
        then raise `LeftoverProcesses` naming the survivors, after SIGKILLing them."""
        candidates = self._seen | self.process_tree().pids()
        left = await wait_pids_gone(candidates, grace)
        left = sorted({*left, *_cookie.marked(self.run_id)})
        if left:
            for pid in left:
                _kill(pid)
            raise LeftoverProcesses(f"run {self.run_id}: pids {left} outlived the supervisor")

    # -- internals ------------------------------------------------------------------------

    async def _attach(self) -> None:
        self.run_id = (await self.status()).run_id
        self.process_tree()

    async def _fault(self, rank: int, fault: Fault) -> None:
        if not self.fake_rank:
            raise NeedsFakeRank(
                f"{fault.kind.value} is a fault of the fake rank ({' '.join(FAKE_RANK)}), and this "
                "deployment runs another command: use signal_rank or crash_rank, or start "
                "it without command="
            )
        status = await self.status()
        index = rank - status.ranks[0].rank
        (await self._client.post(fault.url(self.ports[index]))).raise_for_status()

    async def _close(self, grace: float) -> None:
        """Stop the supervisor if it still runs (SIGTERM, then the kill), check leftovers."""
        try:
            if self.returncode is None:
                self.process_tree()
                self.signal_supervisor(signal.SIGTERM)
                with trio.move_on_after(grace + 5.0):
                    await self.wait_exit()
                if self.returncode is None:
                    self._force_stop()
                    with trio.fail_after(10.0):
                        await self.wait_exit()
            await self.assert_no_leftovers()
        finally:
            await self._client.aclose()

    @abc.abstractmethod
    def _force_stop(self) -> None:
        """SIGKILL the supervisor, or skip the rest of its grace period."""


class _CliDeployment(Deployment):
    def __init__(
        self,
        cli: CliSupervisor,
        control_url: str,
        ports: tuple[int, ...],
        *,
        fake_rank: bool,
        status_file: Path,
    ) -> None:
        super().__init__(Form.CLI, control_url, ports, fake_rank=fake_rank)
        self.cli = cli
        self._status_file = status_file

    async def status(self) -> SupervisorStatus:
        return status_from_json(await self.status_document())

    async def _changed_since(self, version: int) -> None:
        # The long poll routers use: it answers at the first change after `version`.
        params = {"wait": str(REREAD), "version": str(version)}
        with contextlib.suppress(httpx.TransportError):  # gone: the next read says so
            await self._client.get(f"{self.control_url}/ranks", params=params)

    async def final_status(self) -> SupervisorStatus:
        if self.returncode is None:
            return await self.status()
        try:
            document = json.loads(self._status_file.read_text())
        except FileNotFoundError:
            raise AssertionError(
                f"the supervisor exited with {self.returncode} and wrote no --status-file "
                f"(killed?):\n{self.cli.log}"
            ) from None
        return status_from_json(document)

    def signal_supervisor(self, signum: int) -> None:
        if self._signalled_at is None:
            self._signalled_at = trio.current_time()
        self.cli.send_signal(signum)

    async def wait_exit(self) -> int:
        return await self.cli.wait()

    @property
    def returncode(self) -> int | None:
        return self.cli.process.returncode

    def _supervisor_pid(self) -> int | None:
        return self.cli.pid

    def _force_stop(self) -> None:
        self.cli.send_signal(signal.SIGKILL)


class _LibraryDeployment(Deployment):
    def __init__(
        self, handle: SupervisorHandle, ports: tuple[int, ...], *, fake_rank: bool
    ) -> None:
        super().__init__(Form.LIBRARY, handle.control_url, ports, fake_rank=fake_rank)
        self.handle = handle

    async def status(self) -> SupervisorStatus:
        return self.handle.status()

    async def _changed_since(self, version: int) -> None:
        while self.handle.status().version == version:
            await self.handle.wait_changed()

    async def final_status(self) -> SupervisorStatus:
        return self.handle.status()

    def signal_supervisor(self, signum: int) -> None:
        """As the CLI treats signals: the first requests shutdown, the next kills."""
        if signum not in (signal.SIGTERM, signal.SIGINT):
            raise ValueError(
                f"the library form runs in this process and takes SIGTERM or SIGINT, not "
                f"{signal.Signals(signum).name}: use Form.CLI to send other signals"
            )
        if self._signalled_at is not None:
            self.handle.kill()
        else:
            self._signalled_at = trio.current_time()
        self.handle.request_shutdown(signum)

    async def wait_exit(self) -> int:
        with default_bound():
            return await self.handle.wait_stopped()

    @property
    def returncode(self) -> int | None:
        return self.handle.exit_status

    def _force_stop(self) -> None:
        self.handle.kill()


class Harness:
    """Starts supervisors of fake ranks in `nursery` and cleans up after them.

    Use it through the pytest plugin's `dpsup` fixture, or `open_harness`::

        async with open_harness() as harness:
            deployment = await harness.start(2)
            ...
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._deployments: list[tuple[Deployment, float]] = []
        self._files = Path(tempfile.mkdtemp(prefix="trio-dpsup-harness-"))

    async def start(
        self,
        ranks: int,
        *,
        form: Form = Form.LIBRARY,
        rank_args: Sequence[str] = (),
        command: Sequence[str] | None = None,
        wait_ready: bool = True,
        nvml: NvmlFactory | None = None,
        **settings: Unpack[SupervisorSettings],
    ) -> Deployment:
        """Start a supervisor of `ranks` fake ranks on free loopback ports.

        `rank_args` go to every fake rank (``--ready-after``, ``--ignore-sigterm``...);
        `command` replaces the fake rank (``{port}`` and the other placeholders apply; the
        faults that need the fake rank then raise `NeedsFakeRank`). `settings` are
        `SupervisorConfig` fields (``grace_period=3``), on top of fast-probe defaults; the
        CLI form passes them as the matching options. With `wait_ready` (default), returns
        once every rank is ready, bounded by the startup timeout. `nvml` (library form only)
        replaces NVML, e.g. with `FakeNvml.factory`. In the library form, a failure before
        every rank process exists is raised from here, as `Supervisor.run` raises it.
        """
        base = settings.get("base_port") or free_port_range(ranks)
        argv = (*(command or (*FAKE_RANK, "--port", "{port}")), *rank_args)
        fake_rank = command is None or tuple(command[: len(FAKE_RANK)]) == FAKE_RANK
        merged: SupervisorSettings = {**FAST_SETTINGS, "control_port": 0, **settings}
        merged["base_port"] = base
        ports = tuple(range(base, base + ranks))
        deployment: Deployment
        if form is Form.CLI:
            if nvml is not None:
                raise ValueError("nvml is injected into the library form only")
            if "status_file" not in merged:
                merged["status_file"] = str(self._files / f"status-{len(self._deployments)}.json")
            deployment = await self._nursery.start(
                self._run_cli, ranks, base, argv, merged, fake_rank
            )
        else:
            config = SupervisorConfig(command=argv, ranks=ranks, **merged)
            supervisor = Supervisor(config) if nvml is None else Supervisor(config, nvml=nvml)
            deployment = await self._nursery.start(self._run_library, supervisor, ports, fake_rank)
        self._deployments.append((deployment, merged["grace_period"]))
        await deployment._attach()
        if wait_ready:
            with trio.fail_after(merged["startup_timeout"] + 5.0):
                await deployment.wait_ready()
        return deployment

    async def close(self) -> None:
        """Shut down every deployment still running and check that nothing is left.

        Raises `LeftoverProcesses` (after killing them) if any process outlived its
        supervisor. The nursery it was given is left to its owner: its tasks end with
        their supervisors. **Cancellation**: shielded; bounded by each grace period plus
        seconds.
        """
        with trio.CancelScope(shield=True):
            errors: list[LeftoverProcesses] = []
            for deployment, grace in self._deployments:
                try:
                    await deployment._close(grace)
                except LeftoverProcesses as exc:
                    errors.append(exc)
            self._deployments.clear()
        shutil.rmtree(self._files, ignore_errors=True)
        if errors:
            raise LeftoverProcesses("; ".join(map(str, errors)))

    async def _run_cli(
        self,
        ranks: int,
        base: int,
        argv: Sequence[str],
        settings: SupervisorSettings,
        fake_rank: bool,
        task_status: trio.TaskStatus[Deployment],
    ) -> None:
        args = ["--ranks", str(ranks), *cli_options(settings), "--", *argv]
        async with open_cli_supervisor(args) as cli:
            try:
                url = await cli.control_url()
            except AssertionError:
                code = await cli.wait()
                raise AssertionError(f"the supervisor exited with {code}:\n{cli.log}") from None
            ports = tuple(range(base, base + ranks))
            assert settings.get("status_file") is not None  # `start` gives the CLI form one
            status_file = Path(str(settings.get("status_file")))
            task_status.started(
                _CliDeployment(cli, url, ports, fake_rank=fake_rank, status_file=status_file)
            )
            await cli.process.wait()  # until it exits: `Harness.close` stops it

    async def _run_library(
        self,
        supervisor: Supervisor,
        ports: tuple[int, ...],
        fake_rank: bool,
        task_status: trio.TaskStatus[Deployment],
    ) -> None:
        failure: SupervisorFailure | None = None

        async def run(task_status: trio.TaskStatus[SupervisorHandle]) -> None:
            # A failure is the deployment's outcome, read through its exit status; it must
            # not tear down the test's nursery.
            nonlocal failure
            try:
                await supervisor.run(task_status=task_status)
            except SupervisorFailure as exc:
                failure = exc

        early: SupervisorFailure | None = None
        async with trio.open_nursery() as nursery:
            try:
                handle: SupervisorHandle = await nursery.start(run)
            except RuntimeError:
                # It failed before it could hand out its handle (a rank died while the
                # others were being started): that failure is what `start` raises.
                if failure is None:
                    raise
                early = failure
            else:
                task_status.started(_LibraryDeployment(handle, ports, fake_rank=fake_rank))
        if early is not None:
            raise early


@contextlib.asynccontextmanager
async def open_harness() -> AsyncIterator[Harness]:
    """A `Harness` for the duration of the block; on the way out, its deployments are shut
    down and checked for leftovers, as the ``dpsup`` fixture does."""
    async with trio.open_nursery() as nursery:
        harness = Harness(nursery)
        try:
            yield harness
        finally:
            await harness.close()


def cli_options(settings: SupervisorSettings) -> list[str]:
    """Harness settings as the CLI options that set them: ``grace_period=3`` ->
    ``--grace-period 3``, from the same declarations the CLI's parser is made of (for a
    test that runs ``python -m trio_dpsup`` itself, with the harness's `FAST_SETTINGS`)."""
    for name in ("command", "ranks", "env"):
        if name in settings:
            raise ValueError(f"{name} is set by the harness or has no CLI option")
    return cli_arguments(SupervisorConfig, settings)


def _rank_entry(status: SupervisorStatus, rank: int) -> RankStatus:
    for entry in status.ranks:
        if entry.rank == rank:
            return entry
    raise AssertionError(f"no rank {rank} in /status")


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
