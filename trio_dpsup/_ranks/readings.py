"""The metrics readings: one read of a ready rank's metrics per reading tick, for both
checks that need its gauges. The progress check (progress.py) holds a busy rank whose
counter stands still against its limit; the canary (canary.py) proves that an idle rank
still generates.

Why one read for both, on a shared clock: an idle supervisor's CPU goes mostly on its
small exchanges with the ranks and on the wakes of its event loop. Read separately, on
timers of their own, the two checks cost more than the health probes of the same ranks.
That was 0.27-0.30 % of a core for 8 idle fake ranks with canaries on, against
0.13-0.17 % with probes only (bench/canary_idle.py measures it now). So there is one read
where there were two, no read of the canary's own after it is sent, and the ticks fall on
the probes' grid (`prober.Ticker`): every rank's reading and probe go out in the same
wake.

Readings come every `reading_interval`: `progress_interval`, or `canary_idle` when that is
shorter (or when the progress check is off), so a canary is never later than one reading
after it is due. An idle rank is read at every tick too, not only when its canary is due:
the progress check must see a rank turn busy within one `progress_interval` (skipping
those reads saved 0.015 % of a core at N = 8, and left a short busy spell unseen).
"""

from __future__ import annotations

from collections.abc import Callable

from .._config.concerns import CanarySettings, ProgressSettings
from .._state.board import RankRecord
from .._state.status import CanaryResult, RankState
from .canary import Canaries, canary_exchange
from .prober import ExchangeFactory, Ticker
from .progress import (
    LearnedLimit,
    NoAnswer,
    ProgressCheck,
    fetch_metrics,
    require,
    scan_metrics_soon,
)

__all__ = ["reading_interval", "watch_metrics"]


def reading_interval(progress: ProgressSettings, canary: CanarySettings) -> float:
    """Seconds between two readings of a rank's metrics (see the module)."""
    if not progress.progress_on:
        return canary.canary_idle
    if not canary.canary_on:
        return progress.progress_interval
    return min(progress.progress_interval, canary.canary_idle)


async def watch_metrics(
    progress: ProgressSettings,
    canary: CanarySettings,
    record: RankRecord,
    exchanges: ExchangeFactory,
    ticker: Ticker,
    learned: LearnedLimit | None = None,
    observe_canary: Callable[[int, CanaryResult], None] | None = None,
) -> None:
    """Read one rank process's metrics at each tick of `ticker` while it is ready, and give
    each reading to the progress check and the canary. Raises what they raise
    (`RankStalled`, `GenerationFailed`); returns at once when both are off, for every
    rank or (the canary, after a configuration error) for this one. `learned`: the rank's
    learned progress limit, with ``auto`` (see progress.ProgressCheck).

    **Cancellation**: prompt; an in-flight read or canary is abandoned.
    """
    stall = ProgressCheck(progress, record, learned) if progress.progress_on else None
    canaries = None
    if canary.canary_on and canary.canary_spec is not None:
        canaries = Canaries(
            canary, record, canary_exchange(canary, record, exchanges), observe_canary
        )
    metrics = exchanges(record.plan.port, "GET", progress.address.metrics_path, None, ())
    try:
        while stall is not None or (canaries is not None and not canaries.off):
            now = await ticker.wait()  # the reading's time: the tick's, on the grid
            # The progress check holds a draining rank too (a stall ends the drain); a
            # canary goes only to a rank that serves.
            ready = record.state is RankState.READY and not record.probes_paused
            if stall is not None and not ready:
                stall.reset()
            if canaries is not None and not (ready and record.serving):
                canaries.reset()
            if not ready:
                continue
            names = (*(stall.names if stall else ()), *(canaries.names if canaries else ()))
            try:
                text = await fetch_metrics(metrics, progress.probe_timeout)
                sums = await scan_metrics_soon(text, names)
            except (ValueError, NoAnswer) as exc:
                why = str(exc) or type(exc).__name__
                for check in (stall, canaries):
                    if check is not None:
                        check.unreadable(why)
                continue
            if stall is not None:
                try:
                    stall.reading(now, require(sums, stall.names))
                except ValueError as exc:  # this check's metric is missing
                    stall.unreadable(str(exc))
            if canaries is not None and record.serving and not canaries.off:
                try:
                    wanted = require(sums, canaries.names)
                except ValueError as exc:
                    canaries.unreadable(str(exc))
                else:
                    await canaries.reading(now, wanted)
    finally:
        await metrics.aclose()
        if canaries is not None:
            await canaries.aclose()
