"""What every rank task shares (`RankContext`), and the wiring that makes it for a run: the
spawner thread, the log pump, the probe client, the probes' clock and the restart policy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx

from .._config.concerns import LogSettings, RankSettings
from .._config.enums import LogFormat
from .._errors import SupervisorFailure
from .._gpu.nvml import NvmlBackend
from .._output.log_files import LogFiles, RankFiles
from .._output.pump import LogPump, open_log_pump
from .._proc.cgroup import RunCgroups
from .._proc.guardian import Guardian
from .._proc.membership import Trees
from .._proc.owners import Owner, owner_from_trees
from .._proc.process_tree import TreeScanner
from .._proc.spawn import Spawner, open_spawner
from .._proc.stop import StopClock
from .._state.board import Board
from .._state.status import CanaryResult, ProbeResult
from .prober import (
    ExchangeFactory,
    RankProbe,
    Ticker,
    exchange_factory,
    open_probe_client,
    probe_factory,
)
from .readings import reading_interval
from .restart import Restarter

__all__ = ["RankContext", "open_rank_context"]


@dataclass(frozen=True)
class RankContext:
    """What every rank task shares."""

    #: What the rank tasks read, by concern.
    settings: RankSettings
    board: Board
    spawner: Spawner
    scanner: TreeScanner
    #: Told of every rank process (and cgroup) as it starts.
    guardian: Guardian
    #: The shutdown's clock: one grace deadline for every rank.
    clock: StopClock
    #: Makes the health probe of the rank on a port (see prober.probe_factory).
    probes: Callable[[int], RankProbe]
    #: Makes the other exchanges with a rank: metrics reads, canaries (prober.exchange_factory).
    exchanges: ExchangeFactory
    #: The clock of the ready ranks' probes.
    ticker: Ticker
    #: The clock of the ready ranks' metrics readings (readings.py), on the probes' grid.
    readings: Ticker
    restarter: Restarter
    environ: Mapping[str, str]
    fail: Callable[[SupervisorFailure], SupervisorFailure]
    #: Whose a pid is (for naming port and GPU holders), and NVML where it is available.
    owner: Callable[[int], Owner]
    nvml: NvmlBackend | None
    observe: Callable[[int, ProbeResult], None] | None = None
    #: Sees each canary (for its latency histogram).
    observe_canary: Callable[[int, CanaryResult], None] | None = None
    pump: LogPump | None = None
    #: The ranks' cgroups, with --cgroups.
    cgroups: RunCgroups | None = None
    #: The checked --evidence-dir's descriptor (evidence.py makes its folders through it).
    evidence_dir: int | None = None


@asynccontextmanager
async def open_rank_context(
    settings: RankSettings,
    board: Board,
    *,
    trees: Trees,
    scanner: TreeScanner,
    guardian: Guardian,
    clock: StopClock,
    environ: Mapping[str, str],
    fail: Callable[[SupervisorFailure], SupervisorFailure],
    nvml: NvmlBackend | None,
    cgroups: RunCgroups | None,
    log_dir: int | None,
    evidence_dir: int | None,
    transport: httpx.AsyncBaseTransport | None,
    observe: Callable[[int, ProbeResult], None] | None,
    observe_canary: Callable[[int, CanaryResult], None] | None = None,
) -> AsyncIterator[RankContext]:
    """The rank tasks' shared context, with the spawner, the log pump (which takes `log_dir`,
    the checked --log-dir's descriptor, over) and the probe client open for its lifetime.
    The caller runs ``ctx.ticker.run`` and ``ctx.readings.run`` beside the rank tasks.

    **Cancellation**: closing waits for the spawner's thread and drains the pump.
    """
    async with (
        open_spawner() as spawner,
        _open_pump(settings.logs, log_dir) as pump,
        open_probe_client(settings.probes.address, transport) as client,
    ):
        restarts = settings.restarts
        ticker = Ticker(settings.probes.probe_interval)
        yield RankContext(
            settings=settings,
            board=board,
            spawner=spawner,
            scanner=scanner,
            guardian=guardian,
            cgroups=cgroups,
            clock=clock,
            probes=probe_factory(
                settings.probes.address, client, through_httpx=transport is not None
            ),
            exchanges=exchange_factory(
                settings.probes.address, client, through_httpx=transport is not None
            ),
            ticker=ticker,
            readings=Ticker(reading_interval(settings.progress, settings.canary), ticker),
            restarter=Restarter(
                restarts.restart,
                restarts.scope,
                max_restarts=restarts.max_restarts,
                window=restarts.restart_window,
                backoff_min=restarts.restart_backoff_min,
                backoff_max=restarts.restart_backoff_max,
            ),
            environ=environ,
            fail=fail,
            owner=owner_from_trees(trees),
            nvml=nvml,
            observe=observe,
            observe_canary=observe_canary,
            pump=pump,
            evidence_dir=evidence_dir,
        )


@asynccontextmanager
async def _open_pump(config: LogSettings, log_dir: int | None) -> AsyncIterator[LogPump | None]:
    """The log pump when ranks' output is relayed; None when they inherit ours."""
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
