"""Hang detection by progress: /health answering 200 does not mean the engine works.

Every `progress_interval`, each ready rank's own Prometheus metrics are read (through the
probes' own HTTP client, and scanned for the few samples wanted: see `metric_sums`; in a
worker thread when the page is large, as vLLM's is). While the busy
gauge is above 0 and the progress counter stays where it was for `progress_timeout`
seconds, the rank has stalled (`RankStalled`). An idle rank never stalls: the clock starts
again whenever the rank is idle or its counter moves. A rank whose metrics cannot be read is
reported in /status, not failed: a missing page is no evidence of a hang.

With ``--progress-timeout auto`` each rank process learns its own limit (`LearnedLimit`):
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

import httpx
import trio

from .._config.concerns import ProgressSettings
from .._errors import RankStalled
from .._state.board import RankRecord
from .._state.status import ProgressStatus, RankState
from .prober import RankExchange

__all__ = [
    "LearnedLimit",
    "NoAnswer",
    "StallClock",
    "fetch_metrics",
    "metric_sums",
    "metric_sums_soon",
    "parse_progress",
    "read_metrics",
    "watch_progress",
]

logger = logging.getLogger(__name__)

#: A metrics page larger than this is not read (a runaway label set): reported, not parsed.
MAX_METRICS_BYTES = 16 * 2**20
#: A page up to this size is parsed on the Trio thread: a trip to a worker thread costs
#: more than parsing a small page (llama-server's, a fake rank's); vLLM's go to a thread.
INLINE_PARSE_BYTES = 32 * 1024


def metric_sums(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each metric of `names` in `text`, summed over its label sets (vLLM labels by model
    and engine). Raises ValueError naming a metric that is missing."""
    # A scan of the text format's sample lines (``name{labels} value [timestamp]``), not
    # prometheus-client's parser: it builds every family of the page, which cost most of
    # an idle supervisor's CPU once each rank's page was read every few seconds.
    # tests/test_progress.py holds the two to the same sums.
    sums = dict.fromkeys(names, 0.0)
    seen: set[str] = set()
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
        if name not in sums:
            continue
        fields = rest.split()
        if not fields:
            raise ValueError(f"a sample of {name} with no value: {line[:200]!r}")
        sums[name] += float(fields[0])  # ValueError for a value that is no number
        seen.add(name)
    missing = [name for name in sums if name not in seen]
    if missing:
        raise ValueError(f"no {' or '.join(missing)} in the rank's metrics")
    return sums


async def metric_sums_soon(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """`metric_sums`, on this thread for a small page, in a worker thread for a large one."""
    if len(text) <= INLINE_PARSE_BYTES:
        return metric_sums(text, names)
    return await trio.to_thread.run_sync(metric_sums, text, names)


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

    def add(self, gap: float) -> None:
        self._gaps.append(gap)
        self.seen += 1

    def limit(self) -> float:
        if self.seen < WARMUP_GAPS:
            return min(max(WARMUP_SECONDS, self._low), self._high)
        ordered = sorted(self._gaps)
        quantile = ordered[max(0, math.ceil(QUANTILE * len(ordered)) - 1)]
        return min(max(FACTOR * quantile, self._low), self._high)


async def watch_progress(
    config: ProgressSettings, record: RankRecord, metrics: RankExchange
) -> None:
    """Read one rank process's metrics every `progress_interval` while it is ready; raise
    `RankStalled` once it has been busy without progress for `progress_timeout`. Returns at
    once when the check is off.

    **Cancellation**: prompt; an in-flight read is abandoned.
    """
    if not config.progress_on:
        return
    busy_metric, progress_metric = config.progress_busy_metric, config.progress_metric
    assert busy_metric is not None  # both filled in by the config
    assert progress_metric is not None
    clock = StallClock()
    learned = None
    if config.progress_learned:
        learned = LearnedLimit(config.progress_timeout_min, config.progress_timeout_max)
    limit = learned.limit() if learned is not None else config.progress_timeout
    assert limit is not None  # a fixed limit, when not learned
    while True:  # ends by cancellation or by the stall it raises
        await trio.sleep(config.progress_interval)
        if record.state is not RankState.READY or record.probes_paused:
            clock = StallClock()  # not serving yet (or any more): nothing to hold against it
            continue
        try:
            text = await fetch_metrics(metrics, config.probe_timeout)
            sums = await metric_sums_soon(text, (busy_metric, progress_metric))
            busy, progress = sums[busy_metric], sums[progress_metric]
        except (ValueError, NoAnswer) as exc:
            problem = f"cannot read {config.address.metrics_path}: {exc or type(exc).__name__}"
            if record.progress is None or record.progress.problem != problem:
                rank = record.plan.rank
                logger.warning("rank %d: %s", rank, problem, extra={"rank": rank})
            last = record.progress
            record.note_progress(
                ProgressStatus(
                    None if last is None else last.busy,
                    None if last is None else last.progress,
                    0.0 if last is None else last.stalled_for,
                    problem,
                    limit,
                    0 if learned is None else learned.seen,
                )
            )
            continue
        stalled_for = clock.observe(trio.current_time(), busy, progress)
        if learned is not None:
            if clock.gap is not None:
                learned.add(clock.gap)
            limit = learned.limit()
        seen = 0 if learned is None else learned.seen
        record.note_progress(ProgressStatus(busy, progress, stalled_for, None, limit, seen))
        if stalled_for >= limit:
            raise RankStalled(
                record.plan.rank, busy_metric, busy, progress_metric, progress, stalled_for
            )


class NoAnswer(Exception):
    """A rank's metrics did not come within the time given."""


async def read_metrics(client: httpx.AsyncClient, url: str, timeout: float) -> str:  # noqa: ASYNC109
    """GET `url` within `timeout` seconds (a verdict, like a probe's): its text. Raises
    httpx.HTTPError, ValueError (a page too large) or NoAnswer.

    **Cancellation**: prompt; the request is abandoned."""
    with trio.move_on_after(timeout):
        response = await client.get(url)
        response.raise_for_status()
        if len(response.content) > MAX_METRICS_BYTES:
            raise ValueError(f"the page is larger than {MAX_METRICS_BYTES} bytes")
        return response.text
    raise NoAnswer(f"no answer within {timeout:g}s")
