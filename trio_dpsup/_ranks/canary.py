"""The canary: prove that an idle rank still generates, since /health answering 200 does not.

A rank is idle when its busy gauges (running and queued requests) read 0 and its progress
counter has not moved: the progress check (progress.py) sees a hang only while a rank is
busy, and a rank that takes no traffic is never busy. So, once a rank has been idle for
`canary_idle` seconds, it gets a one-token generation, the canary (its request: see
_config/canary.py). Never a busy rank, even one whose counter is still (a long prefill):
that one is the progress check's. At most one canary is in flight per rank, and the canary
itself restarts the idle clock (it moves the counter): one canary per idle rank per
`canary_idle`.

A canary that fails (no answer within `canary_timeout`, an error, a status other than 2xx)
is confirmed by one more, sent at once; two failures in a row fail the rank
(`GenerationFailed`). A hang is therefore caught within canary-idle + 2 x canary-timeout
(plus a read of the gauges) of the rank's last work. The health probes' failure threshold
does not apply.

A rank's first canary refused with 401, 403, 404 or 405 is a configuration error (a key the
supervisor does not know, a path or model the server does not have), not a broken rank: it
is logged once, with the fix, and canaries stay off for that rank (``/status`` and the
``trio_dpsup_canary_off`` metric say so).

The canary carries the rank's API key as a Bearer token when the rank's command gives one
(``--api-key KEY``: vLLM's and llama-server's option; llama-server takes a comma-separated
list, of which the first is used). A key given only through the environment
(``VLLM_API_KEY``, ``LLAMA_API_KEY``) is not read: pass it on the command line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import trio

from .._config.concerns import CanarySettings
from .._errors import GenerationFailed
from .._state.board import RankRecord
from .._state.status import CanaryResult
from .prober import ExchangeFactory, RankExchange
from .progress import NoAnswer, fetch_metrics, metric_sums_soon

__all__ = ["CONFIG_STATUSES", "IdleClock", "api_key", "watch_generation"]

logger = logging.getLogger(__name__)

#: Statuses that, on a rank's first canary, mean the request is wrong, not the rank.
CONFIG_STATUSES = {
    401: "the rank wants an API key: give it as --api-key KEY in the rank's command",
    403: "the rank refuses the API key: give the right one as --api-key KEY in the rank's command",
    404: "the rank has no such path or model: check --canary-request (for vLLM, the model "
    "name: --served-model-name or the model argument)",
    405: "the rank does not take this method at this path: check --canary-request's METHOD",
}
#: Canaries in a row that fail the rank: one, and the one that confirms it.
ATTEMPTS = 2
#: The most bytes of an answer kept for a message.
_SHOWN = 200
#: The largest canary answer read (a one-token completion is a few hundred bytes).
MAX_ANSWER_BYTES = 1024 * 1024


def api_key(argv: Sequence[str]) -> str | None:
    """The first API key the rank's command gives with ``--api-key KEY`` (or
    ``--api-key=KEY``; a comma-separated list gives its first); None if none."""
    for index, arg in enumerate(argv):
        option, eq, value = arg.partition("=")
        if option != "--api-key":
            continue
        if not eq:
            value = argv[index + 1] if index + 1 < len(argv) else ""
        first = value.split(",", 1)[0].strip()
        return first or None
    return None


class IdleClock:
    """How long a rank has been idle with its counter unmoved, from its readings."""

    def __init__(self) -> None:
        self._last: float | None = None
        self._since: float | None = None
        self.busy = True
        self._read_now = False

    def observe(self, now: float, busy: float, progress: float) -> float:
        """Seconds idle with the counter unmoved, as of the reading taken at `now`: counted
        from the first reading that found it so (never from a busy one: it may have been
        busy until just before)."""
        self.busy = busy > 0
        self._read_now = False
        if self.busy:
            self._since = None
            return 0.0
        if progress != self._last or self._since is None:
            self._last = progress
            self._since = now
        return now - self._since

    def next_reading(self, now: float, config: CanarySettings) -> float:
        """Seconds until the next reading is worth taking: when the idle rank's canary is
        due, or, while it is busy (or not read yet), after `progress_interval`."""
        if self._read_now:
            return 0.0
        if self.busy or self._since is None:
            return config.progress_interval
        return max(0.0, self._since + config.canary_idle - now)

    def canary_sent(self) -> None:
        """The canary moved the counter: start again from the next reading (taken at once)."""
        self._last = None
        self._since = None
        self.busy = False
        self._read_now = True


async def watch_generation(
    config: CanarySettings,
    record: RankRecord,
    exchanges: ExchangeFactory,
    observe: Callable[[int, CanaryResult], None] | None = None,
) -> None:
    """Send canaries to one rank process while it is ready, serving and idle; raise
    `GenerationFailed` at the second failure in a row. Returns at once when canaries are
    off (for every rank, or for this one after a configuration error), and when a
    configuration error turns them off.

    **Cancellation**: prompt; a canary in flight is abandoned.
    """
    spec = config.canary_spec
    if not config.canary_on or spec is None:
        return
    if record.canary is not None and record.canary.off is not None:
        return  # off since an earlier process's first canary: the same command, the same error
    port = record.plan.port
    headers: list[tuple[str, str]] = []
    if spec.body is not None:
        headers.append(("Content-Type", "application/json"))
    key = api_key(record.plan.argv)
    if key is not None:
        headers.append(("Authorization", f"Bearer {key}"))
    metrics = exchanges(port, "GET", config.address.metrics_path, None, ())
    canary = exchanges(port, spec.method, spec.path, spec.body, tuple(headers))
    try:
        await _watch(config, record, metrics, canary, observe)
    finally:
        await metrics.aclose()
        await canary.aclose()


async def _watch(
    config: CanarySettings,
    record: RankRecord,
    metrics: RankExchange,
    canary: RankExchange,
    observe: Callable[[int, CanaryResult], None] | None,
) -> None:
    spec = config.canary_spec
    assert spec is not None
    rank = record.plan.rank
    progress_metric = config.canary_progress_metric
    assert progress_metric is not None  # the config refuses a canary without one
    names = (*config.canary_busy_metrics, progress_metric)
    idle = IdleClock()
    while True:  # ends by cancellation, by a configuration error, or by the failure it raises
        await trio.sleep(idle.next_reading(trio.current_time(), config))
        if not record.serving or record.probes_paused:
            idle = IdleClock()  # not serving (yet, or any more): nothing to prove
            continue
        try:
            text = await fetch_metrics(metrics, config.probe_timeout)
            sums = await metric_sums_soon(text, names)
        except (ValueError, NoAnswer) as exc:
            record.canary_problem(
                f"cannot read {config.address.metrics_path}: {exc or type(exc).__name__}"
            )
            idle = IdleClock()  # idle is not proven: no canary
            continue
        record.canary_problem(None)
        busy = sum(sums[name] for name in config.canary_busy_metrics)
        if idle.observe(trio.current_time(), busy, sums[progress_metric]) < config.canary_idle:
            continue
        first = record.canary is None or record.canary.sent == 0
        for attempt in range(1, ATTEMPTS + 1):
            result = await _send(canary, config)
            record.record_canary(result)
            if observe is not None:
                observe(rank, result)
            if result.ok:
                break
            fix = CONFIG_STATUSES.get(result.status_code or 0)
            if first and fix is not None:
                why = f"the canary {spec.describe()} was refused with HTTP {result.status_code}"
                logger.error(
                    "rank %d: %s: %s; canaries are off for this rank",
                    rank,
                    why,
                    fix,
                    extra={"rank": rank},
                )
                record.canary_off(f"{why}: {fix}")
                return
            logger.warning(
                "rank %d: a canary failed (%d of %d): %s",
                rank,
                attempt,
                ATTEMPTS,
                result.error,
                extra={"rank": rank},
            )
            first = False
        else:
            raise GenerationFailed(rank, ATTEMPTS, result.error or "")
        idle.canary_sent()


# The timeout is part of the verdict (a slow canary is a failed one), not a cancel bound.
async def _send(canary: RankExchange, config: CanarySettings) -> CanaryResult:
    """One canary within `canary_timeout` seconds: a 2xx with its whole body is a success;
    a failure's answer is quoted (its start) in the error."""
    result, body = await canary.fetch(config.canary_timeout, MAX_ANSWER_BYTES)
    error = result.error
    if error is not None and result.status_code is not None and body:
        error += ": " + body[:_SHOWN].decode("utf-8", errors="replace").strip()
    return CanaryResult(result.ok, result.status_code, error, result.latency, time.time())
