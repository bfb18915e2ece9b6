"""A rank's drain before a planned stop: take it out, let what it is doing finish, and only
then signal it.

In this order, run by the rank's own task (rank.py) when an operator drains or restarts it
and when the supervisor is asked to stop:

1. **Out.** /ranks, /prometheus/targets and its /ranks/{r}/ready drop it at once, and the
   router feed (_plane/routers.py) takes it out of every router; the drain waits until each
   router's own listing no longer shows it, at most ``--router-timeout`` (past it, it goes
   on: the router's own health checks remain).
2. **The delay**, ``--drain-delay``: what a pull-based balancer (HAProxy, a kubelet's
   readiness probe) needs to notice: its check interval x fall count.
3. **In flight to zero.** The engine's in-flight gauges (``--inflight-metric``, by default
   the preset's) are read until their sum is 0 on two reads in a row, `POLL` apart, at most
   ``--drain-timeout``. Two, because a request the router sent just before it was told may
   still be on its way in. Gauges that cannot be read (no metrics, a 404, a rank that does
   not answer) are "unknown": said once, and the drain ends; it never waits out the
   timeout on them.

Measured on llama-server (build 11434): sent SIGTERM with requests in flight, it stops
answering them and does not exit while their clients wait, so a stop that does not wait
for the gauge loses every request in flight and the grace period too.

A second signal (`StopClock.kill_now`) ends every drain at once. A failure is not planned:
it is never drained (the feed takes the rank out of the routers at once all the same).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from .._config.concerns import DrainSettings
from .._state.board import RankRecord
from .._state.status import DrainEnd, DrainReason
from .context import RankContext
from .prober import RankExchange
from .progress import NoAnswer, fetch_metrics, require, scan_metrics_soon

__all__ = ["POLL", "drain_rank"]

# Under a public name, as the operator's actions (trio_dpsup.admin): what a drain found is
# theirs to read and filter on.
logger = logging.getLogger("trio_dpsup.drain")

#: Between reads of the in-flight gauges during a drain.
POLL = 0.1
#: Failed reads of the gauges in a row that make the count "unknown" (a rank that does not
#: answer, a 404, a missing gauge): the drain then ends, never waiting out its timeout.
UNREADABLE = 3


async def drain_rank(record: RankRecord, ctx: RankContext, reason: DrainReason) -> DrainEnd | None:
    """Drain `record`'s rank, taken out by `RankRecord.request_drain` (see the module's
    docstring), and say how it ended; None when it was withdrawn before its end (an
    operator's undrain, a later request). The rank stays out (``record.drain``) until its
    process stops or an operator undrains it.

    **Cancellation**: prompt; the rank stays out. A second signal ends it as SKIPPED.
    """
    config = ctx.settings.drain
    rank = record.plan.rank
    assert record.drain is not None  # taken out by request_drain
    began = record.drain.began
    start = trio.current_time()  # (it was taken out when the drain was asked for)
    logger.info("rank %d: draining (%s)", rank, reason.value, extra={"rank": rank})
    end: DrainEnd | None = DrainEnd.SKIPPED
    try:
        with ctx.clock.interruptible():
            end = await _drain(record, ctx, began)
    except trio.Cancelled:
        # Cut short from outside too (a second signal and the stop of everything in one
        # tick, a failure): it ended all the same, and /status says so.
        record.end_drain(began, DrainEnd.SKIPPED, trio.current_time() - start)
        raise
    seconds = trio.current_time() - start
    if end is None:
        logger.info("rank %d: drain withdrawn after %.2fs", rank, seconds, extra={"rank": rank})
        return None
    record.end_drain(began, end, seconds)
    how = {
        DrainEnd.EMPTY: "nothing in flight",
        DrainEnd.TIMEOUT: f"{_count(record)} still in flight at --drain-timeout "
        f"{config.drain_timeout:g}s: they are lost",
        DrainEnd.UNKNOWN: "in flight unknown, after --drain-delay",
        DrainEnd.SKIPPED: "cut short by a second signal",
    }[end]
    level = logging.WARNING if end is DrainEnd.TIMEOUT else logging.INFO
    logger.log(level, "rank %d drained in %.2fs: %s", rank, seconds, how, extra={"rank": rank})
    return end


def _count(record: RankRecord) -> str:
    inflight = None if record.drain is None else record.drain.inflight
    return "requests" if inflight is None else f"{inflight:g} request(s)"


async def _drain(record: RankRecord, ctx: RankContext, began: float) -> DrainEnd | None:
    """The three waits; None as soon as the drain is withdrawn."""
    board = ctx.board

    def withdrawn() -> bool:
        return not record.draining_since(began)

    await _until_routers_forget(record, ctx, withdrawn)
    with trio.move_on_after(ctx.settings.drain.drain_delay):
        while not withdrawn():  # an undrain wakes it; the delay ends it
            await board.changed.wait()
    if withdrawn():
        return None
    return await _until_idle(record, ctx, began)


async def _until_routers_forget(
    record: RankRecord, ctx: RankContext, withdrawn: Callable[[], bool]
) -> None:
    """Wait until no router's listing shows the rank, at most --router-timeout."""
    board, rank = ctx.board, record.plan.rank

    def listing() -> list[str]:
        return [r.name for r in board.routers.values() if rank in r.listed]

    with trio.move_on_after(ctx.settings.drain.router_timeout):
        while listing() and not withdrawn():
            await board.changed.wait()
        return
    logger.warning(
        "rank %d: still listed by %s after --router-timeout %gs: draining anyway (its health "
        "checks remain)",
        rank, ", ".join(listing()), ctx.settings.drain.router_timeout, extra={"rank": rank},
    )  # fmt: skip


async def _until_idle(record: RankRecord, ctx: RankContext, began: float) -> DrainEnd | None:
    """Read the in-flight gauges until they sum to 0 twice in a row, at most --drain-timeout;
    None once the drain is withdrawn. A read that fails is tried again (a busy engine can be
    slow to answer its /metrics); `UNREADABLE` failures in a row make the count unknown."""
    config = ctx.settings.drain
    names = config.inflight_metrics
    if not names:
        return DrainEnd.UNKNOWN
    # The probes' own client, one connection kept across the polls (as the readings do).
    metrics = ctx.exchanges(record.plan.port, "GET", config.address.metrics_path, None, ())
    try:
        return await _poll_inflight(record, config, metrics, names, began)
    finally:
        await metrics.aclose()


async def _poll_inflight(
    record: RankRecord,
    config: DrainSettings,
    metrics: RankExchange,
    names: tuple[str, ...],
    began: float,
) -> DrainEnd | None:
    rank = record.plan.rank
    idle_reads = failures = 0
    with trio.move_on_after(config.drain_timeout):
        while record.draining_since(began):
            try:
                text = await fetch_metrics(metrics, config.probe_timeout)
                sums = require(await scan_metrics_soon(text, names), names)
            except (ValueError, NoAnswer) as exc:
                failures += 1
                if failures < UNREADABLE:
                    await trio.sleep(POLL)
                    continue
                record.note_inflight(began, None)
                logger.warning(
                    "rank %d: its requests in flight are unknown (cannot read %s: %s): "
                    "stopping it after --drain-delay alone",
                    rank, config.address.metrics_path, exc or type(exc).__name__,
                    extra={"rank": rank},
                )  # fmt: skip
                return DrainEnd.UNKNOWN
            failures = 0
            inflight = sum(sums.values())
            record.note_inflight(began, inflight)
            idle_reads = idle_reads + 1 if inflight <= 0 else 0
            if idle_reads == 2:
                return DrainEnd.EMPTY
            await trio.sleep(POLL)
        return None
    return DrainEnd.TIMEOUT
