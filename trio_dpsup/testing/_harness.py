"""The failure-injection harness: supervisors of fake ranks, faults, and a leftover check.

`Harness.start` runs a supervisor in either form — the CLI as a subprocess, or the library
in this process — and returns a `Deployment`: the same methods for both, so one test can
cover both forms. The harness owns every deployment it started: on `Harness.close` (the
pytest fixture calls it) each one still running is shut down, and every process of its tree
must be gone, or the test fails with the survivors named (and killed, so they cannot leak
into the next test).
"""

from __future__ import annotations

import abc
import contextlib
import enum
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from .._config.config import SupervisorConfig
from .._config.options import cli_arguments
from .._errors import SupervisorFailure
from .._gpu.nvml import NvmlFactory
from .._proc import cookie as _cookie
from .._supervisor import Supervisor, SupervisorHandle
from ._cli_process import CliSupervisor, open_cli_supervisor
from ._ports import free_port_range
from ._procs import alive, wait_pids_gone

__all__ = ["FAKE_RANK", "Deployment", "Form", "Harness", "LeftoverProcesses", "ProcessTree"]

#: The fake rank's command; `Harness.start` appends ``--port {port}`` and the rank args.
FAKE_RANK = (sys.executable, "-m", "trio_dpsup.testing.fake_rank")

#: Settings that make faults show within a second, unless a test chooses its own.
FAST_SETTINGS: Mapping[str, Any] = {
    "probe_interval": 0.1,
    "probe_timeout": 0.5,
    "failure_threshold": 2,
    "grace_period": 5.0,
    "startup_timeout": 60.0,
    # Fake ranks need no GPU; on a GPU machine, tests must not claim (or lack) devices.
    "gpus_per_rank": 0,
}

#: The CLI's last log line after a failure.
_STOPPED_AFTER = re.compile(r"stopped after a failure: (.*)$", re.MULTILINE)
#: Spacing of /status reads while waiting for a state: fine enough for tests, light on CPU.
_POLL_SPACING = 0.01
#: How long the leftover check waits for a tree to finish exiting.
_LEFTOVER_TIMEOUT = 5.0


class Form(enum.Enum):
    """How the supervisor runs: as its users run it."""

    CLI = "cli"  # python -m trio_dpsup, a subprocess
    LIBRARY = "library"  # Supervisor.run, in this process's Trio run


class LeftoverProcesses(AssertionError):
    """Processes of a supervised tree outlived their supervisor (they have been killed)."""


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
    """One running supervisor of fake ranks, in either form.

    Faults go to a rank's fake server over HTTP, signals go to its pid from /status, and
    waits read /status until a condition holds, each bounded by a timeout in seconds.
    """

    def __init__(self, form: Form, control_url: str, ports: tuple[int, ...]) -> None:
        self.form = form
        #: Where the control plane listens.
        self.control_url = control_url
        #: Each local rank's port, in rank order.
        self.ports = ports
        self.run_id = ""  # set by `_attach`, from the first /status
        self._client = httpx.AsyncClient(trust_env=False, timeout=5.0)
        self._seen: set[int] = set()

    # -- reading the control plane --------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """GET /status, parsed."""
        response = await self._client.get(f"{self.control_url}/status")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def ready_code(self, rank: int | None = None) -> int:
        """What GET /ready (or, given `rank`, /ranks/{rank}/ready) answers now: 200 or 503."""
        path = "/ready" if rank is None else f"/ranks/{rank}/ready"
        return (await self._client.get(f"{self.control_url}{path}")).status_code

    async def wait_for_state(self, state: str, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Wait until the supervisor's state is `state` (``"ready"``, ``"stopping"``...);
        return that /status. Fails after `timeout` seconds, naming the last state seen."""
        return await self.wait_for_status(lambda s: s["state"] == state, f"state {state}", timeout)

    async def wait_for_rank_state(
        self,
        rank: int,
        state: str,
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """Wait until rank `rank` is in `state` (``"ready"``, ``"failed"``...); return its
        /status entry."""
        status = await self.wait_for_status(
            lambda s: _rank_entry(s, rank)["state"] == state, f"rank {rank} {state}", timeout
        )
        return _rank_entry(status, rank)

    async def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Wait until every rank is ready; return that /status."""
        status = await self.wait_for_state("ready", timeout)
        self.process_tree()  # remember the ranks' pids for the leftover check
        return status

    # -- faults ---------------------------------------------------------------------------

    async def fail_health(self, rank: int, status_code: int = 503) -> None:
        """Make rank `rank`'s health path answer `status_code` from now on."""
        await self._fault(rank, "/fault/health", {"status": status_code})

    async def hang_health(self, rank: int) -> None:
        """Make rank `rank`'s health path hang: the probe-timeout path."""
        await self._fault(rank, "/fault/hang", {})

    async def crash_rank(self, rank: int, code: int = 1) -> None:
        """Make rank `rank` exit at once with `code` (negative: killed by signal ``-code``)."""
        self.process_tree()
        # It may die before its answer is read; the crash is what was asked for.
        with contextlib.suppress(httpx.TransportError):
            await self._fault(rank, "/fault/exit", {"code": code})

    async def rank_pid(self, rank: int) -> int:
        pid = _rank_entry(await self.status(), rank)["pid"]
        assert isinstance(pid, int), f"rank {rank} has no process"
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

    @abc.abstractmethod
    async def wait_exit(self, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        """Wait for the supervisor to stop; return its exit status."""

    @property
    @abc.abstractmethod
    def returncode(self) -> int | None:
        """The exit status once stopped, else None."""

    @abc.abstractmethod
    def failure(self) -> str | None:
        """Once stopped: the failure the supervisor stopped on, as its log states it (None
        after a clean or requested stop)."""

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

    async def assert_no_leftovers(self, timeout: float = _LEFTOVER_TIMEOUT) -> None:  # noqa: ASYNC109
        """Wait up to `timeout` for every process this deployment ever had to be gone.

        Raises `LeftoverProcesses` naming the survivors, after SIGKILLing them.
        """
        candidates = self._seen | self.process_tree().pids()
        left = await wait_pids_gone(candidates, timeout)
        left = sorted({*left, *_cookie.marked(self.run_id)})
        if left:
            for pid in left:
                _kill(pid)
            raise LeftoverProcesses(f"run {self.run_id}: pids {left} outlived the supervisor")

    # -- internals ------------------------------------------------------------------------

    async def _attach(self) -> None:
        self.run_id = (await self.status())["run_id"]
        self.process_tree()

    async def _fault(self, rank: int, path: str, params: Mapping[str, int]) -> None:
        status = await self.status()
        index = rank - status["ranks"][0]["rank"]
        url = f"http://127.0.0.1:{self.ports[index]}{path}"
        (await self._client.post(url, params=dict(params))).raise_for_status()

    async def wait_for_status(
        self,
        condition: Callable[[dict[str, Any]], bool],
        what: str = "the condition",
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """Wait until `condition` holds for /status; return that /status. Fails after
        `timeout` seconds, saying `what` it waited for and the last state seen."""
        last: dict[str, Any] | None = None
        with trio.move_on_after(timeout):
            for _ in range(math.ceil(timeout / _POLL_SPACING) + 1):
                try:
                    last = await self.status()
                except httpx.TransportError as exc:
                    raise AssertionError(
                        f"waiting for {what}: the control plane is gone (exit status "
                        f"{self.returncode})"
                    ) from exc
                if condition(last):
                    return last
                await trio.sleep(_POLL_SPACING)  # pacing between reads; not a synchronisation
        seen = "nothing" if last is None else f"state {last['state']}, failure {last['failure']}"
        raise AssertionError(f"no {what} within {timeout}s; last seen: {seen}")

    async def _close(self, grace: float) -> None:
        """Stop the supervisor if it still runs (SIGTERM, then the kill), check leftovers."""
        try:
            if self.returncode is None:
                self.process_tree()
                self.signal_supervisor(signal.SIGTERM)
                with trio.move_on_after(grace + 5.0):
                    await self.wait_exit(math.inf)
                if self.returncode is None:
                    self._force_stop()
                    await self.wait_exit(10.0)
            await self.assert_no_leftovers()
        finally:
            await self._client.aclose()

    @abc.abstractmethod
    def _force_stop(self) -> None:
        """SIGKILL the supervisor, or skip the rest of its grace period."""


class _CliDeployment(Deployment):
    def __init__(self, cli: CliSupervisor, control_url: str, ports: tuple[int, ...]) -> None:
        super().__init__(Form.CLI, control_url, ports)
        self.cli = cli

    def signal_supervisor(self, signum: int) -> None:
        self.cli.send_signal(signum)

    async def wait_exit(self, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        return await self.cli.wait(timeout)

    @property
    def returncode(self) -> int | None:
        return self.cli.process.returncode

    def failure(self) -> str | None:
        found = _STOPPED_AFTER.search(self.cli.log)
        return None if found is None else found.group(1)

    def _supervisor_pid(self) -> int | None:
        return self.cli.pid

    def _force_stop(self) -> None:
        self.cli.send_signal(signal.SIGKILL)


class _LibraryDeployment(Deployment):
    def __init__(self, handle: SupervisorHandle, ports: tuple[int, ...]) -> None:
        super().__init__(Form.LIBRARY, handle.control_url, ports)
        self.handle = handle
        self._signalled = False

    def signal_supervisor(self, signum: int) -> None:
        """As the CLI treats signals: the first requests shutdown, the next kills."""
        if signum not in (signal.SIGTERM, signal.SIGINT):
            raise ValueError(
                f"the library form runs in this process and takes SIGTERM or SIGINT, not "
                f"{signal.Signals(signum).name}: use Form.CLI to send other signals"
            )
        if self._signalled:
            self.handle.kill()
        self._signalled = True
        self.handle.request_shutdown(signum)

    async def wait_exit(self, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        with trio.fail_after(timeout):
            return await self.handle.wait_stopped()

    @property
    def returncode(self) -> int | None:
        return self.handle.exit_status

    def failure(self) -> str | None:
        failure = self.handle.status().failure
        return None if failure is None else str(failure)

    def _force_stop(self) -> None:
        self.handle.kill()


class Harness:
    """Starts supervisors of fake ranks in `nursery` and cleans up after them.

    Use it through the pytest plugin's `dpsup` fixture, or directly::

        async with trio.open_nursery() as nursery:
            harness = Harness(nursery)
            try:
                deployment = await harness.start(2)
                ...
            finally:
                await harness.close()
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._deployments: list[tuple[Deployment, float]] = []

    async def start(
        self,
        ranks: int,
        *,
        form: Form = Form.LIBRARY,
        rank_args: Sequence[str] = (),
        command: Sequence[str] | None = None,
        wait_ready: bool = True,
        nvml: NvmlFactory | None = None,
        **settings: Any,
    ) -> Deployment:
        """Start a supervisor of `ranks` fake ranks on free loopback ports.

        `rank_args` go to every fake rank (``--ready-after``, ``--ignore-sigterm``...);
        `command` replaces the fake rank (``{port}`` and the other placeholders apply).
        `settings` are `SupervisorConfig` fields (``grace_period=3``), on top of fast-probe
        defaults; the CLI form passes them as the matching options. With `wait_ready`
        (default), returns once every rank is ready. `nvml` (library form only) replaces
        NVML, e.g. with `FakeNvml.factory`. In the library form, a failure before every rank
        process exists is raised from here, as `Supervisor.run` raises it.
        """
        base = int(settings.pop("base_port", 0)) or free_port_range(ranks)
        argv = (*(command or (*FAKE_RANK, "--port", "{port}")), *rank_args)
        merged = {**FAST_SETTINGS, "control_port": 0, **settings}
        ports = tuple(range(base, base + ranks))
        deployment: Deployment
        if form is Form.CLI:
            if nvml is not None:
                raise ValueError("nvml is injected into the library form only")
            deployment = await self._nursery.start(self._run_cli, ranks, base, argv, merged)
        else:
            config = SupervisorConfig(command=argv, ranks=ranks, base_port=base, **merged)
            supervisor = Supervisor(config) if nvml is None else Supervisor(config, nvml=nvml)
            deployment = await self._nursery.start(self._run_library, supervisor, ports)
        self._deployments.append((deployment, float(merged["grace_period"])))
        await deployment._attach()
        if wait_ready:
            await deployment.wait_ready(float(merged["startup_timeout"]) + 5.0)
        return deployment

    async def close(self) -> None:
        """Shut down every deployment still running and check that nothing is left.

        Raises `LeftoverProcesses` (after killing them) if any process outlived its
        supervisor. **Cancellation**: shielded; bounded by each grace period plus seconds.
        """
        with trio.CancelScope(shield=True):
            errors: list[LeftoverProcesses] = []
            for deployment, grace in self._deployments:
                try:
                    await deployment._close(grace)
                except LeftoverProcesses as exc:
                    errors.append(exc)
            self._deployments.clear()
        self._nursery.cancel_scope.cancel()
        if errors:
            raise LeftoverProcesses("; ".join(map(str, errors)))

    async def _run_cli(
        self,
        ranks: int,
        base: int,
        argv: Sequence[str],
        settings: Mapping[str, Any],
        task_status: trio.TaskStatus[Deployment],
    ) -> None:
        args = [
            "--ranks", str(ranks), "--base-port", str(base), *_cli_options(settings), "--", *argv,
        ]  # fmt: skip
        async with open_cli_supervisor(args) as cli:
            try:
                url = await cli.control_url()
            except AssertionError:
                code = await cli.wait()
                raise AssertionError(f"the supervisor exited with {code}:\n{cli.log}") from None
            task_status.started(_CliDeployment(cli, url, tuple(range(base, base + ranks))))
            await cli.wait(math.inf)

    async def _run_library(
        self,
        supervisor: Supervisor,
        ports: tuple[int, ...],
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
                task_status.started(_LibraryDeployment(handle, ports))
        if early is not None:
            raise early


def _cli_options(settings: Mapping[str, Any]) -> list[str]:
    """`SupervisorConfig` fields as CLI options: ``grace_period=3`` -> ``--grace-period 3``,
    from the same declarations the CLI's parser is made of."""
    for name in ("command", "ranks", "base_port", "env"):
        if name in settings:
            raise ValueError(f"{name} is set by the harness or has no CLI option")
    return cli_arguments(SupervisorConfig, settings)


def _rank_entry(status: Mapping[str, Any], rank: int) -> dict[str, Any]:
    for entry in status["ranks"]:
        if entry["rank"] == rank:
            result: dict[str, Any] = entry
            return result
    raise AssertionError(f"no rank {rank} in /status")


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
