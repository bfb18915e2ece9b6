"""Clean (re)starts: before a rank process starts, its port must be free and its GPUs must
not hold memory it does not expect.

A restarted engine that finds its old process still on the GPU runs out of memory, and one
that finds its port still bound exits at once: both turn one failure into a crash loop. So:

* **Port.** At the first start a held port is bad input (`ConfigError`, naming the holder:
  pid, command line, and whether it is ours). At a restart the holder is waited for, up to
  ``port_wait``, then `PortInUse`.
* **GPU memory, with NVML.** At a restart, the processes of the rank's previous tree must
  have released its GPUs (the driver frees memory after the process is gone, sometimes
  seconds later), up to ``gpu_release_wait``, then `GpuMemoryHeld`. Processes outside this
  run's trees on the rank's GPUs are named in a warning, or with ``require_clean_gpus`` are
  a usage error at the first start and a failure at a restart.

While a restart waits, the rank's /status entry says for what (`RankRecord.waiting`).
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from collections.abc import Callable, Collection, Sequence

import psutil
import trio

from .._config.concerns import CleanStartSettings
from .._config.plan import RankPlan
from .._config.tls import WILDCARD_HOSTS
from .._errors import ConfigError, GpuMemoryHeld, PortInUse
from .._gpu.holders import gpu_holder
from .._gpu.nvml import GpuInfo, NvmlBackend, NvmlError
from .._gpu.placement import GpuHolder
from .._output.redact import redact_argv
from .._proc.owners import UNKNOWN, Owner, OwnerKind, PortHolder
from .._state.board import RankRecord

__all__ = [
    "PortHolder",
    "check_gpus_at_start",
    "check_ports_at_start",
    "port_holders",
    "wait_clean_restart",
]

logger = logging.getLogger(__name__)

#: How often a restart looks again at a held port or GPU memory.
RECHECK = 0.05
#: A command line in a message is cut to this many characters.
_COMMAND_CHARS = 200


def port_in_use(host: str, port: int) -> bool:
    """True if binding `host`:`port` as a server would (with SO_REUSEADDR) fails now."""
    address = WILDCARD_HOSTS.get(host, host)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def port_holders(port: int, owner: Callable[[int], Owner]) -> tuple[PortHolder, ...]:
    """Who listens on `port`: never empty, since one this user cannot see is named as such.
    Blocking (it reads every process's sockets): run it in a thread, and only once the port
    is known to be held."""
    holders: dict[int | None, PortHolder] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port != port:
            continue
        pid = conn.pid
        command = None
        if pid is not None:
            try:
                command = " ".join(redact_argv(psutil.Process(pid).cmdline()))[:_COMMAND_CHARS]
            except psutil.Error:
                command = None
        who = owner(pid) if pid is not None else UNKNOWN
        holders[pid] = PortHolder(pid, command, who)
    return tuple(holders.values()) or (PortHolder(None, None, UNKNOWN),)


def check_ports_at_start(
    plans: Sequence[RankPlan], host: str, owner: Callable[[int], Owner]
) -> None:
    """Raise ConfigError naming the holder of the first rank port that is taken."""
    for plan in plans:
        if port_in_use(host, plan.port):
            named = "; ".join(h.describe() for h in port_holders(plan.port, owner))
            raise ConfigError(
                f"port {plan.port} of rank {plan.rank} is in use by {named}: stop it, or "
                "choose another --base-port"
            )


async def check_gpus_at_start(
    config: CleanStartSettings,
    backend: NvmlBackend,
    plans: Sequence[RankPlan],
    owner: Callable[[int], Owner],
) -> None:
    """Name every process outside this run that holds memory on a rank's GPUs: a warning,
    or with ``require_clean_gpus`` a ConfigError (nothing is started)."""
    # One reading of every rank's GPUs, in one worker thread, then shared out by rank.
    every = await _holders(backend, [gpu for plan in plans for gpu in plan.gpus], owner)
    for plan in plans:
        labels = {gpu.label for gpu in plan.gpus}
        foreign = [h for h in every if h.gpu in labels and not h.owner.ours]
        if foreign and config.require_clean_gpus:
            named = "; ".join(h.describe() for h in foreign)
            raise ConfigError(
                f"rank {plan.rank}'s GPUs are not free: {named}: stop those processes, or "
                "drop --require-clean-gpus to start anyway"
            )
        _warn_foreign(plan.rank, foreign)


async def wait_clean_restart(
    config: CleanStartSettings,
    record: RankRecord,
    previous: Collection[int],
    owner: Callable[[int], Owner],
    backend: NvmlBackend | None,
) -> None:
    """Before a restart: wait for the rank's port to be free and for its previous tree's
    GPU memory (`previous`: that tree's pids) to be released; raise `PortInUse` or
    `GpuMemoryHeld` past their bounds. `record.waiting` says what it waits for.

    **Cancellation**: prompt (a shutdown during the wait); `record.waiting` is cleared.
    """
    plan = record.plan
    try:
        await _wait_port(config, record, owner)
        if backend is not None and plan.gpus:
            await _wait_gpus(config, record, previous, owner, backend)
    finally:
        record.set_waiting(None)


async def _wait_port(
    config: CleanStartSettings, record: RankRecord, owner: Callable[[int], Owner]
) -> None:
    plan = record.plan
    if not port_in_use(config.host, plan.port):
        return
    holders = await trio.to_thread.run_sync(port_holders, plan.port, owner)
    named = "; ".join(h.describe() for h in holders)
    record.set_waiting(f"port {plan.port} held by {named}")
    logger.warning(
        "rank %d waits up to %gs for its port %d, held by %s",
        plan.rank,
        config.port_wait,
        plan.port,
        named,
        extra={"rank": plan.rank},
    )
    start = trio.current_time()
    with trio.move_on_after(config.port_wait):
        for _ in range(_checks(config.port_wait)):  # no event to wait on: look again
            await trio.sleep(RECHECK)
            if not port_in_use(config.host, plan.port):
                return
    raise PortInUse(plan.rank, plan.port, holders, trio.current_time() - start)


async def _wait_gpus(
    config: CleanStartSettings,
    record: RankRecord,
    previous: Collection[int],
    owner: Callable[[int], Owner],
    backend: NvmlBackend,
) -> None:
    plan = record.plan
    start = trio.current_time()
    held: list[GpuHolder] = []
    holders: list[GpuHolder] | None = None  # the last reading, for the foreign check too
    with trio.move_on_after(config.gpu_release_wait):
        for _ in range(_checks(config.gpu_release_wait)):  # no event to wait on: look again
            holders = await _holders(backend, plan.gpus, owner)
            held = [h for h in holders if h.pid in previous]
            if not held:
                break
            record.set_waiting(
                "GPU memory of the previous process: " + "; ".join(h.describe() for h in held)
            )
            await trio.sleep(RECHECK)  # the driver is still tearing the contexts down
    if held:
        raise GpuMemoryHeld(plan.rank, tuple(held), trio.current_time() - start, foreign=False)
    logger.info(
        "rank %d: no GPU memory of its previous process is left (checked for %.3fs)",
        plan.rank,
        trio.current_time() - start,
        extra={"rank": plan.rank},
    )
    if holders is None:  # no time to look while waiting (--gpu-release-wait 0)
        holders = await _holders(backend, plan.gpus, owner)
    foreign = [h for h in holders if h.owner.kind is OwnerKind.OUTSIDE]
    if foreign and config.require_clean_gpus:
        raise GpuMemoryHeld(plan.rank, tuple(foreign), 0.0, foreign=True)
    _warn_foreign(plan.rank, foreign)


def _warn_foreign(rank: int, foreign: Sequence[GpuHolder]) -> None:
    """Name the processes outside this run that hold memory on a rank's GPUs, if any."""
    if foreign:
        logger.warning(
            "rank %d's GPUs hold memory of processes outside this run: %s",
            rank,
            "; ".join(h.describe() for h in foreign),
            extra={"rank": rank},
        )


async def _holders(
    backend: NvmlBackend, gpus: Sequence[GpuInfo], owner: Callable[[int], Owner]
) -> list[GpuHolder]:
    """Every process with memory on `gpus` now. In a thread: NVML and /proc block."""

    def read() -> list[GpuHolder]:
        found = []
        for gpu in gpus:
            try:
                procs = backend.processes(gpu.uuid)
            except NvmlError as exc:
                logger.warning("cannot list the processes on %s: %s", gpu.label, exc)
                continue
            found += [gpu_holder(gpu, proc, owner(proc.pid)) for proc in procs]
        return found

    return await trio.to_thread.run_sync(read)


def _checks(bound: float) -> int:
    """How many looks, RECHECK apart, fit in `bound` seconds (and one more)."""
    return math.ceil(bound / RECHECK) + 1
