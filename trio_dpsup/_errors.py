"""The exceptions trio_dpsup raises, and the exit status each one maps to.

A supervisor stops for one reason, the first failure it saw. Each failure is an exception
raised by the task that saw it; the nursery turns it into cancellation of everything else,
and `Supervisor.run` re-raises that first failure alone (not an exception group), so callers
can write ``except RankExited``.
"""

from __future__ import annotations

import signal
import typing

if typing.TYPE_CHECKING:  # only for annotations: this module stays light
    from ._gpu.placement import GpuHolder
    from ._proc.owners import PortHolder

__all__ = [
    "ConfigError",
    "GenerationFailed",
    "GpuFailed",
    "GpuLeftovers",
    "GpuMemoryHeld",
    "GroupFailed",
    "PortInUse",
    "RankExited",
    "RankSpawnFailed",
    "RankStalled",
    "RankStartTimeout",
    "RankUnhealthy",
    "RestartRequested",
    "RestartedWith",
    "RestartsExhausted",
    "StartupStalled",
    "StartupTimeout",
    "SupervisorFailure",
    "SupervisorStopped",
]

#: Exit status for a usage or configuration error (the argparse convention).
EXIT_USAGE = 2
#: Exit status when the first failure has no process status of its own (probe, deadline).
EXIT_FAILURE = 1


class ConfigError(ValueError):
    """Bad input: the message says what to change. Raised before anything is started."""


class SupervisorFailure(Exception):
    """The first failure that made a supervisor stop. `exit_status` is the CLI's exit code.

    Each kind keeps its constructor's arguments as attributes of the same names, so that
    /status can carry it as data and the harness can rebuild it (see _state/document.py).
    """

    #: The rank that failed first; None for a failure of no single rank.
    rank: int | None = None

    @property
    def exit_status(self) -> int:
        return EXIT_FAILURE


class RankExited(SupervisorFailure):
    """A rank's process exited without being asked to, with any status (0 included)."""

    def __init__(self, rank: int, returncode: int) -> None:
        self.rank = rank
        #: As in `subprocess.Popen.returncode`: negative for death by a signal.
        self.returncode = returncode
        super().__init__(f"rank {rank} exited unexpectedly: {describe_returncode(returncode)}")

    @property
    def exit_status(self) -> int:
        # Exit 0 after a crash is the bug this project exists to avoid: an unexpected
        # exit with status 0 is still a failure.
        if self.returncode == 0:
            return EXIT_FAILURE
        if self.returncode < 0:
            return 128 - self.returncode  # the shell's convention for death by signal
        if self.returncode == EXIT_USAGE:
            # 2 means "bad input, nothing started" from us; a rank's own 2 (often its
            # argument parser's) is a failure like any other. The cause names the 2.
            return EXIT_FAILURE
        return self.returncode


class RankSpawnFailed(SupervisorFailure):
    """A rank's command could not be executed (it passed validation, then exec failed)."""

    def __init__(self, rank: int, reason: str) -> None:
        self.rank = rank
        self.reason = reason
        super().__init__(f"rank {rank} could not be started: {reason}")


class RankUnhealthy(SupervisorFailure):
    """A ready rank failed `failure_threshold` consecutive health probes."""

    def __init__(self, rank: int, failures: int, last_error: str) -> None:
        self.rank = rank
        self.failures = failures
        self.last_error = last_error
        super().__init__(
            f"rank {rank} is unhealthy: {failures} consecutive probe failures, last: {last_error}"
        )


class RankStalled(SupervisorFailure):
    """A ready rank was busy (`busy_metric` > 0) while its progress counter did not advance
    for `seconds`: the engine hangs though /health may still answer 200."""

    def __init__(
        self,
        rank: int,
        busy_metric: str,
        busy: float,
        progress_metric: str,
        progress: float,
        seconds: float,
    ) -> None:
        self.rank = rank
        self.busy_metric = busy_metric
        self.busy = busy
        self.progress_metric = progress_metric
        self.progress = progress
        self.seconds = seconds
        super().__init__(
            f"rank {rank} stalled: {busy_metric} = {busy:g} but {progress_metric} stayed at "
            f"{progress:g} for {seconds:.1f}s"
        )


class GenerationFailed(SupervisorFailure):
    """A ready, idle rank failed `attempts` canaries in a row (one-token generations, the
    second sent at once to confirm the first): /health may answer, but it does not
    generate."""

    def __init__(self, rank: int, attempts: int, last_error: str) -> None:
        self.rank = rank
        self.attempts = attempts
        self.last_error = last_error
        super().__init__(
            f"rank {rank} generation failed: {attempts} canaries in a row, last: {last_error}"
        )


class StartupStalled(SupervisorFailure):
    """A starting rank showed no work moving toward ready (bytes read from storage, GPU
    memory growth, output lines) for `seconds`: a wedged load, failed before the startup
    deadline. `last_moved` says what moved last, and when."""

    def __init__(self, rank: int, seconds: float, last_moved: str) -> None:
        self.rank = rank
        self.seconds = seconds
        self.last_moved = last_moved
        super().__init__(
            f"rank {rank} startup stalled: nothing moved toward ready (bytes read, GPU "
            f"memory, output lines) for {seconds:.1f}s; last moved: {last_moved}"
        )


class StartupTimeout(SupervisorFailure):
    """Not every rank became ready within the startup deadline."""

    def __init__(self, timeout: float, not_ready: tuple[int, ...]) -> None:
        self.timeout = timeout
        self.not_ready = not_ready
        self.rank = not_ready[0] if not_ready else None
        ranks = ", ".join(str(r) for r in not_ready)
        super().__init__(f"startup timed out after {timeout:g}s; ranks not ready: {ranks}")


class RankStartTimeout(SupervisorFailure):
    """A restarted rank did not become ready within the startup timeout."""

    def __init__(self, rank: int, timeout: float) -> None:
        self.rank = rank
        self.timeout = timeout
        super().__init__(f"rank {rank} did not become ready within {timeout:g}s of its restart")


class RestartsExhausted(SupervisorFailure):
    """More restarts than the restart policy allows within its window: stop everything."""

    def __init__(self, last: SupervisorFailure, max_restarts: int, window: float) -> None:
        self.last = last
        self.max_restarts = max_restarts
        self.window = window
        self.rank = last.rank
        super().__init__(f"more than {max_restarts} restart(s) within {window:g}s; last: {last}")

    @property
    def exit_status(self) -> int:
        return self.last.exit_status  # the root cause's status, as if it had not restarted


class RestartedWith(SupervisorFailure):
    """Why a rank restarted that did not fail itself: with ``restart_scope=all``, another
    rank's failure (`cause`) restarts every rank. A restart cause, never a supervisor's."""

    def __init__(self, rank: int, cause: SupervisorFailure) -> None:
        self.rank = rank
        self.cause = cause
        super().__init__(f"restarted with rank {cause.rank}: {cause}")


class PortInUse(SupervisorFailure):
    """A rank's port was still held when it was to restart, past ``port_wait``."""

    def __init__(
        self, rank: int, port: int, holders: tuple[PortHolder, ...], waited: float
    ) -> None:
        self.rank = rank
        self.port = port
        self.holders = holders
        self.waited = waited
        named = "; ".join(h.describe() for h in holders) or "a process this user cannot see"
        super().__init__(
            f"rank {rank} cannot restart: its port {port} is still held after {waited:.1f}s, "
            f"by {named}"
        )


class GpuMemoryHeld(SupervisorFailure):
    """A rank could not restart onto clean GPUs: its previous process's memory was not
    released within ``gpu_release_wait`` (`foreign` False), or processes outside this run
    held memory there with ``require_clean_gpus`` (`foreign` True)."""

    def __init__(
        self, rank: int, holders: tuple[GpuHolder, ...], waited: float, *, foreign: bool
    ) -> None:
        self.rank = rank
        self.holders = holders
        self.waited = waited
        self.foreign = foreign
        named = "; ".join(holder.describe() for holder in holders)
        if foreign:
            why = f"processes outside this run hold memory on its GPUs: {named}"
        else:
            why = f"its previous process's GPU memory was still held after {waited:.1f}s: {named}"
        super().__init__(f"rank {rank} cannot restart: {why}")


class RestartRequested(SupervisorFailure):
    """An operator asked for this rank's restart (``trio-dpsup ctl restart``). A restart
    cause, never a supervisor's."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        super().__init__(f"rank {rank} restarted on request")


class GpuFailed(SupervisorFailure):
    """A rank's GPU failed: NVML reports it lost, or a critical Xid error on it."""

    def __init__(self, rank: int, gpu: str, cause: str) -> None:
        self.rank = rank
        self.gpu = gpu
        self.cause = cause
        super().__init__(f"rank {rank}: {gpu} failed: {cause}")


class GroupFailed(SupervisorFailure):
    """Another member of this supervisor's group across nodes failed, stopped answering for
    longer than ``peer_timeout``, or never appeared within ``startup_timeout``: every member
    stops its ranks and exits, so that the group is recreated whole. `member` and `node`
    name the member where the group's failure began, `reason` what happened there."""

    def __init__(self, member: int, node: str | None, reason: str) -> None:
        self.member = member
        self.node = node
        self.reason = reason
        where = f"member {member}" if node is None else f"member {member} ({node})"
        super().__init__(f"group failed: {where} {reason}")


class GpuLeftovers(SupervisorFailure):
    """After shutdown, processes still held memory on the ranks' GPUs (with
    ``fail_on_leftovers``). Only the exit status when nothing failed before."""

    def __init__(self, leftovers: tuple[GpuHolder, ...]) -> None:
        self.leftovers = leftovers
        super().__init__(
            f"{len(leftovers)} process(es) still hold GPU memory after shutdown: "
            + "; ".join(holder.describe() for holder in leftovers)
        )


class SupervisorStopped(RuntimeError):
    """Raised by `SupervisorHandle.wait_ready` when shutdown began before every rank was
    ready. `failure` (also the ``__cause__``) is the failure that stopped it, if any; the
    failure itself is raised by `Supervisor.run`."""

    def __init__(self, failure: SupervisorFailure | None) -> None:
        self.failure = failure
        reason = "a shutdown was requested" if failure is None else str(failure)
        super().__init__(f"the supervisor stopped before every rank was ready: {reason}")


def describe_returncode(returncode: int) -> str:
    """``exit status 3`` or ``killed by SIGKILL``, for logs and messages."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}"


def first_failure(group: BaseExceptionGroup[SupervisorFailure]) -> SupervisorFailure:
    """The first failure in `group`, depth first: the one a nursery saw first."""
    first = group.exceptions[0]
    return first if isinstance(first, SupervisorFailure) else first_failure(first)
