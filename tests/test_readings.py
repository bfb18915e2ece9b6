"""The metrics readings' cadence (readings.py), on Trio's mock clock: one read every
--progress-interval serves the progress check and the canary, an idle rank gets one canary
per --canary-idle and no read of its own, and a busy one gets no canary."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

# The ranks family's own loop, unit-tested on purpose: its cadence is what it is for.
from trio_dpsup import SupervisorConfig
from trio_dpsup._config.concerns import CanarySettings, ProgressSettings, derive
from trio_dpsup._config.plan import RankPlan
from trio_dpsup._ranks.prober import Ticker
from trio_dpsup._ranks.readings import reading_interval, watch_metrics
from trio_dpsup._state.board import Board
from trio_dpsup._state.status import ProbeResult

pytest_plugins = ["trio_dpsup.testing.plugin"]

PLAN = RankPlan(rank=0, local_rank=0, port=8000, devices=(), argv=("rank",), env=())
CONFIG = SupervisorConfig(
    command=("rank",),
    canary=True,
    canary_request=("POST", "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 1})),
    progress_busy_metric="busy",
    progress_metric="tokens_total",
)  # defaults otherwise: --canary-idle 10, --progress-interval 5, --progress-timeout auto


class Rank:
    """A rank's two exchanges as the readings see them: its metrics page (the gauges set
    here) and its canary (which generates one token); every request counted."""

    def __init__(self) -> None:
        self.busy = 0
        self.tokens = 0
        self.reads: list[float] = []
        self.canaries: list[float] = []

    def exchange(
        self, port: int, method: str, path: str, body: bytes | None, headers: object
    ) -> _Exchange:
        return _Exchange(self, path == "/metrics")


class _Exchange:
    def __init__(self, rank: Rank, metrics: bool) -> None:
        self._rank = rank
        self._metrics = metrics

    async def fetch(self, timeout: float, max_body: int) -> tuple[ProbeResult, bytes]:  # noqa: ASYNC109
        rank = self._rank
        if self._metrics:
            rank.reads.append(trio.current_time())
            page = f"busy {rank.busy}\ntokens_total {rank.tokens}\n"
            return ProbeResult(True, 200, None, 0.001), page.encode()
        rank.canaries.append(trio.current_time())
        rank.tokens += 1
        return ProbeResult(True, 200, None, 0.001), b'{"choices": []}'

    async def aclose(self) -> None:
        pass


async def run_for(seconds: float, rank: Rank, *, busy: bool = False) -> None:
    board = Board((PLAN,), run_id="run")
    record = board.ranks[0]
    record.started(1234)
    board.mark_ready(record)
    rank.busy = 1 if busy else 0
    progress, canary = derive(ProgressSettings, CONFIG), derive(CanarySettings, CONFIG)
    probes = Ticker(1.0)  # as the supervisor's: the readings tick on the probes' ticks
    ticker = Ticker(reading_interval(progress, canary), probes)
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probes.run)
            nursery.start_soon(ticker.run)
            nursery.start_soon(watch_metrics, progress, canary, record, rank.exchange, ticker)
            if busy:  # a busy rank that makes progress: no stall, and no canary
                while True:
                    await trio.sleep(1.0)
                    rank.tokens += 10


async def test_an_idle_rank_gets_a_canary_per_idle_period_and_no_read_of_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rank = Rank()
    await run_for(100.0, rank)
    # First seen idle at the first tick; then a canary every 10 s, on the 5 s reads (two
    # checks used to read four times a period: twice each, and once after each canary).
    assert 9 <= len(rank.canaries) <= 10
    assert 19 <= len(rank.reads) <= 20
    gaps = [b - a for a, b in zip(rank.canaries, rank.canaries[1:], strict=False)]
    assert gaps == pytest.approx([10.0] * len(gaps), abs=0.01)


async def test_a_busy_rank_is_read_every_progress_interval_and_gets_no_canary(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rank = Rank()
    await run_for(100.0, rank, busy=True)
    assert rank.canaries == []
    assert 19 <= len(rank.reads) <= 20
    gaps = [b - a for a, b in zip(rank.reads, rank.reads[1:], strict=False)]
    assert gaps == pytest.approx([5.0] * len(gaps), abs=0.01)


async def _ticks(
    tickers: dict[str, Ticker], run: list[Ticker], seconds: float
) -> dict[str, list[float]]:
    seen: dict[str, list[float]] = {name: [] for name in tickers}

    async def collect(name: str, ticker: Ticker) -> None:
        while True:
            at = await ticker.wait()
            assert at == trio.current_time()  # autojump: each tick wakes at its grid time
            seen[name].append(at)

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for ticker in run:
                await nursery.start(ticker.run)
            for name, ticker in tickers.items():
                nursery.start_soon(collect, name, ticker)
    return seen


async def test_a_ticker_on_a_base_ticks_on_its_ticks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    probes = Ticker(1.0)
    tickers = {
        "probes": probes,
        "readings": Ticker(5.0, probes),  # one base tick in five
        "walks": Ticker(1.0, probes),  # every base tick: the base's own
        "odd": Ticker(1.5, probes),  # no whole multiple: a timer of its own
    }
    seen = await _ticks(tickers, list(tickers.values()), 20.5)
    assert seen["probes"] == [float(t) for t in range(1, 21)]
    assert seen["readings"] == [5.0, 10.0, 15.0, 20.0]
    assert seen["walks"] == seen["probes"]
    assert seen["odd"] == [1.5 * t for t in range(1, 14)]


async def test_a_ticker_on_a_base_has_no_timer_of_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Its base not running, it never ticks: the timer that wakes the loop is the base's.
    probes = Ticker(1.0)
    readings, walks, odd = Ticker(5.0, probes), Ticker(1.0, probes), Ticker(1.5, probes)
    seen = await _ticks(
        {"readings": readings, "walks": walks, "odd": odd}, [readings, walks, odd], 20.5
    )
    assert seen["readings"] == seen["walks"] == []
    assert len(seen["odd"]) == 13


async def test_a_ticker_on_a_base_that_missed_its_tick_ticks_at_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The loop held up 2 s at 8.5 s: the probes' ticker misses its tick at 10 s. The
    # readings' tick of that period comes at the base's next tick (11 s), counted as 10 s,
    # not a whole period later.
    probes = Ticker(1.0)
    readings = Ticker(5.0, probes)
    seen: list[tuple[float, float]] = []

    async def collect() -> None:
        while True:
            at = await readings.wait()
            seen.append((at, trio.current_time()))

    async def hold_up() -> None:
        await trio.sleep_until(8.5)
        autojump_clock.jump(2.0)  # as a blocking call would: no task runs meanwhile

    with trio.move_on_after(20.5):
        async with trio.open_nursery() as nursery:
            await nursery.start(probes.run)
            await nursery.start(readings.run)
            nursery.start_soon(collect)
            nursery.start_soon(hold_up)
    assert [at for at, _ in seen] == [5.0, 10.0, 15.0, 20.0]
    assert seen[1][1] == pytest.approx(11.0)
