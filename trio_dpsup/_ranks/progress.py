"""Hang detection by progress: /health answering 200 does not mean the engine works.

Every `progress_interval`, each ready rank's own Prometheus metrics are read (readings.py:
one read serves this check and the canary) and scanned for the few samples wanted (see
`scan_metrics`; in a worker thread when the page is large, as vLLM's is). While the busy
gauge is above 0 and the progress counter stays where it was for `progress_timeout`
seconds, the rank has stalled (`RankStalled`). An idle rank never stalls: the clock starts
again whenever the rank is idle or its counter moves. A rank whose metrics cannot be read is
reported in /status, not failed: a missing page is no evidence of a hang.

With ``--progress-timeout auto`` each rank learns its own limit (`LearnedLimit`, kept
across its restarts):
from the gaps between its counter's moves while busy, 3 x their 99th percentile, within
`progress_timeout_min` and `progress_timeout_max`; `WARMUP_SECONDS` (within the same
bounds) until `WARMUP_GAPS` gaps are seen. A quantile times a factor rather than an
accrual detector (phi): phi fits a distribution (normal, or exponential) to the gaps by
their mean and variance, and these gaps are nothing like one: quantized to the reading
interval, and bimodal (decode steps of milliseconds, prefill batches of seconds), so the
first long prefill after many short steps scores a huge phi, which is the busy-is-not-hung
mistake this check must not make. A quantile assumes no shape, is bounded, and reads as a
number of seconds an operator can check against the engine's own step times.

One engine step (one decode call) longer than anything seen before, and longer than the
learned limit, is taken for a hang: the limit knows only what the rank has done. That is
what `progress_timeout_min` is for: keep it above the slowest single step the engine may
take (for llama.cpp, one -ub batch of a prompt at the rank's prefill speed; default 30 s).
"""

from __future__ import annotations

import collections
import logging
import math

import trio

from .._config.concerns import ProgressSettings
from .._errors import RankStalled
from .._state.board import RankRecord
from .._state.status import ProgressStatus
from .prober import RankExchange

__all__ = [
    "LearnedLimit",
    "NoAnswer",
    "ProgressCheck",
    "StallClock",
    "fetch_metrics",
    "learned_limit",
    "metric_sums",
    "parse_progress",
    "require",
    "scan_metrics",
    "scan_metrics_soon",
]

logger = logging.getLogger(__name__)

#: A metrics page larger than this is not read (a runaway label set): reported, not parsed.
MAX_METRICS_BYTES = 16 * 2**20
#: A page up to this size is parsed on the Trio thread: a trip to a worker thread costs
#: more than parsing a small page (llama-server's, a fake rank's); vLLM's go to a thread.
INLINE_PARSE_BYTES = 32 * 1024


def scan_metrics(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each metric of `names` that `text` has, summed over its label sets (vLLM labels by
    model and engine); one it has not is left out. Raises ValueError for a sample whose
    value is missing or no number."""
    # A scan of the text format's sample lines (``name{labels} value [timestamp]``), not
    # prometheus-client's parser: it builds every family of the page, which cost most of
    # an idle supervisor's CPU once each rank's page was read every few seconds.
    # tests/test_progress.py holds the two to the same sums.
    sums: dict[str, float] = {}
    wanted = set(names)
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace, space = line.find("{"), line.find(" ")
        if brace >= 0 and (space < 0 or brace < space):
            name, rest = line[:brace], line[line.rfind("}") + 1 :]
        elif space >= 0:
            name, rest = line[:space], line[space:]
        else:
            continue
        if name not in wanted:
            continue
        fields = rest.split()
        if not fields:
            raise ValueError(f"a sample of {name} with no value: {line[:200]!r}")
        sums[name] = sums.get(name, 0.0) + float(fields[0])  # ValueError: no number
    return sums


def require(sums: dict[str, float], names: tuple[str, ...]) -> dict[str, float]:
    """`sums` (from `scan_metrics`) for `names`; raises ValueError naming those missing."""
    missing = [name for name in names if name not in sums]
    if missing:
        raise ValueError(f"no {' or '.join(missing)} in the rank's metrics")
    return {name: sums[name] for name in names}


def metric_sums(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each metric of `names` in `text`, summed over its label sets. Raises ValueError
    naming a metric that is missing."""
    return require(scan_metrics(text, names), names)


async def scan_metrics_soon(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """`scan_metrics`, on this thread for a small page, in a worker thread for a large one."""
    if len(text) <= INLINE_PARSE_BYTES:
        return scan_metrics(text, names)
    return await trio.to_thread.run_sync(scan_metrics, text, names)


async def fetch_metrics(metrics: RankExchange, timeout: float) -> str:  # noqa: ASYNC109
    """A rank's metrics page through `metrics` (a GET of its metrics path), within
    `timeout` seconds. Raises NoAnswer with the reason (an error, a status, no answer).

    **Cancellation**: prompt; the request is abandoned."""
    result, body = await metrics.fetch(timeout, MAX_METRICS_BYTES)
    if not result.ok:
        raise NoAnswer(result.error or "no answer")
    return body.decode("utf-8", errors="replace")


def parse_progress(text: str, busy_metric: str, progress_metric: str) -> tuple[float, float]:
    """The busy gauge and the progress counter in `text` (see `metric_sums`)."""
    sums = metric_sums(text, (busy_metric, progress_metric))
    return sums[busy_metric], sums[progress_metric]


class StallClock:
    """How long a rank has been busy without progress, from its readings."""

    def __init__(self) -> None:
        self._last: float | None = None
        self._since = 0.0
        self._busy = False
        #: The gap the last reading closed: seconds from the counter's previous move (or
        #: the start of the busy spell) to this move, when busy all along; else None.
        self.gap: float | None = None

    def observe(self, now: float, busy: float, progress: float) -> float:
        """Seconds busy with the counter unmoved, as of the reading taken at `now`."""
        moved = progress != self._last
        self.gap = now - self._since if busy > 0 and self._busy and moved else None
        if busy <= 0 or moved:
            # Idle, or it moved (a restarted counter moves too): the clock starts again.
            self._last = progress
            self._since = now
        self._busy = busy > 0
        return now - self._since


#: ``--progress-timeout auto``: the learned limit is FACTOR x the QUANTILE of the gaps.
FACTOR = 3.0
QUANTILE = 0.99
#: Gaps kept (the most recent), and those needed before the limit is learned.
WINDOW = 512
WARMUP_GAPS = 20
#: The limit until then (within the bounds): the grace that gave no false restarts in the
#: field (gonka-ai/gonka#1421: a token-progress check with a 120 s grace).
WARMUP_SECONDS = 120.0


class LearnedLimit:
    """One rank process's progress limit, learned from its own gaps (see the module)."""

    def __init__(self, low: float, high: float) -> None:
        self._low = low
        self._high = high
        self._gaps: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self.seen = 0
        self._limit = min(max(WARMUP_SECONDS, low), high)

    def add(self, gap: float) -> None:
        self._gaps.append(gap)
        self.seen += 1
        if self.seen >= WARMUP_GAPS:  # worked out once a gap, not at every reading
            ordered = sorted(self._gaps)
            quantile = ordered[max(0, math.ceil(QUANTILE * len(ordered)) - 1)]
            self._limit = min(max(FACTOR * quantile, self._low), self._high)

    def limit(self) -> float:
        return self._limit


def learned_limit(config: ProgressSettings) -> LearnedLimit | None:
    """A rank's learned limit, with ``--progress-timeout auto``; None with a fixed one."""
    if not config.progress_learned:
        return None
    return LearnedLimit(config.progress_timeout_min, config.progress_timeout_max)


class ProgressCheck:
    """The progress check of one rank process: fed its metrics readings (readings.py), it
    raises `RankStalled` once the rank has been busy without progress for its limit (the
    fixed `progress_timeout`, or the one it learns), and shows each reading in /status.

    `learned` (with ``auto``) is the rank's, not the process's: the rank task keeps it
    across restarts (see `learned_limit`), since the same command on the same GPUs steps
    at the same pace, and a restarted rank should not wait out the warm-up again."""

    def __init__(
        self, config: ProgressSettings, record: RankRecord, learned: LearnedLimit | None = None
    ) -> None:
        busy_metric, progress_metric = config.progress_busy_metric, config.progress_metric
        assert busy_metric is not None  # both filled in by the config
        assert progress_metric is not None
        self.names = (busy_metric, progress_metric)
        self._record = record
        self._clock = StallClock()
        # With auto, the rank's limit when given; else a fresh one (this process's only).
        self._learned = (learned or learned_limit(config)) if config.progress_learned else None
        limit = self._learned.limit() if self._learned is not None else config.progress_timeout
        assert limit is not None  # a fixed limit, when not learned
        self._limit = limit
        self._path = config.address.metrics_path

    def reset(self) -> None:
        """The rank is not serving (yet, or any more): nothing to hold against it."""
        self._clock = StallClock()

    def unreadable(self, why: str) -> None:
        """The reading failed: shown (and logged once per reason), never a failure."""
        problem = f"cannot read {self._path}: {why}"
        last = self._record.progress
        if last is None or last.problem != problem:
            rank = self._record.plan.rank
            logger.warning("rank %d: %s", rank, problem, extra={"rank": rank})
        self._record.note_progress(
            ProgressStatus(
                None if last is None else last.busy,
                None if last is None else last.progress,
                0.0 if last is None else last.stalled_for,
                problem,
                self._limit,
                self._seen,
            )
        )

    def reading(self, now: float, sums: dict[str, float]) -> None:
        """One reading, taken at `now`; raises RankStalled at the limit."""
        busy_metric, progress_metric = self.names
        busy, progress = sums[busy_metric], sums[progress_metric]
        stalled_for = self._clock.observe(now, busy, progress)
        if self._learned is not None:
            if self._clock.gap is not None:
                self._learned.add(self._clock.gap)
            self._limit = self._learned.limit()
        self._record.note_progress(
            ProgressStatus(busy, progress, stalled_for, None, self._limit, self._seen)
        )
        if stalled_for >= self._limit:
            raise RankStalled(
                self._record.plan.rank, busy_metric, busy, progress_metric, progress, stalled_for
            )

    @property
    def _seen(self) -> int:
        return 0 if self._learned is None else self._learned.seen


class NoAnswer(Exception):
    """A rank's metrics did not come within the time given."""
