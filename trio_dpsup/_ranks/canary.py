"""The canary: prove that an idle rank still generates, since /health answering 200 does not.

A rank is idle when its busy gauges (running and queued requests) read 0 and its progress
counter has not moved: the progress check (progress.py) sees a hang only while a rank is
busy, and a rank that takes no traffic is never busy. So, once a rank has been idle for
`canary_idle` seconds, it gets a one-token generation, the canary (its request: see
_config/canary.py). Never a busy rank, even one whose counter is still (a long prefill):
that one is the progress check's. The gauges come from the metrics readings the progress
check takes too (readings.py: one read for both, on the probes' clock), so a canary goes
out at the first reading `canary_idle` or more after the rank was first seen idle. At most
one canary is in flight per rank, and the idle clock starts again at the reading that sent
it, the counter it moved taken as it is at the next: one canary per idle rank per
`canary_idle`, and no read of its own.

A canary that fails (no answer within `canary_timeout`, an error, a status other than 2xx)
is confirmed by one more, sent at once; two failures in a row fail the rank
(`GenerationFailed`). A hang is therefore caught within canary-idle + 2 x canary-timeout
(plus one reading interval) of the rank's last work. The health probes' failure threshold
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

from .._config.concerns import CanarySettings
from .._errors import GenerationFailed
from .._state.board import RankRecord
from .._state.status import CanaryResult
from .prober import ExchangeFactory, RankExchange

__all__ = ["CONFIG_STATUSES", "Canaries", "IdleClock", "api_key", "canary_exchange"]

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

    def observe(self, now: float, busy: float, progress: float) -> float:
        """Seconds idle with the counter unmoved, as of the reading taken at `now`: counted
        from the first reading that found it so (never from a busy one: it may have been
        busy until just before), or from the last canary."""
        if busy > 0:
            self._since = None
            return 0.0
        if self._since is None:
            self._last, self._since = progress, now
        elif self._last is None:
            self._last = progress  # as the last canary left it: that move was the canary's
        elif progress != self._last:
            self._last, self._since = progress, now
        return now - self._since

    def canary_sent(self, at: float) -> None:
        """A canary went out at the reading taken at `at`: idle from then, and the counter it
        moved is taken as the next reading finds it."""
        self._last = None
        self._since = at


class Canaries:
    """The canary of one rank process: fed its metrics readings (readings.py), it sends the
    idle rank its canary, and raises `GenerationFailed` at the second failure in a row.

    `off` once a configuration error turned canaries off for this rank (or an earlier
    process of it did: the same command, the same error).
    """

    def __init__(
        self,
        config: CanarySettings,
        record: RankRecord,
        canary: RankExchange,
        observe: Callable[[int, CanaryResult], None] | None = None,
    ) -> None:
        progress_metric = config.canary_progress_metric
        assert progress_metric is not None  # the config refuses a canary without one
        self.names = (*config.canary_busy_metrics, progress_metric)
        self._config = config
        self._record = record
        self._canary = canary
        self._observe = observe
        self._idle = IdleClock()

    @property
    def off(self) -> bool:
        canary = self._record.canary
        return canary is not None and canary.off is not None

    def reset(self) -> None:
        """The rank is not serving (yet, or any more): nothing to prove."""
        self._idle = IdleClock()

    async def aclose(self) -> None:
        """Close the canary's connection. **Cancellation**: safe."""
        await self._canary.aclose()

    def unreadable(self, why: str) -> None:
        """The gauges could not be read: idle is not proven, so no canary (shown in /status)."""
        self._record.canary_problem(f"cannot read {self._config.address.metrics_path}: {why}")
        self._idle = IdleClock()

    async def reading(self, now: float, sums: dict[str, float]) -> None:
        """One reading, taken at `now`: the canary (and its confirmation) when the rank has
        been idle long enough. Raises GenerationFailed at the second failure in a row.

        **Cancellation**: prompt; a canary in flight is abandoned.
        """
        config, record = self._config, self._record
        self._record.canary_problem(None)
        *busy_metrics, progress_metric = self.names
        busy = sum(sums[name] for name in busy_metrics)
        if self._idle.observe(now, busy, sums[progress_metric]) < config.canary_idle:
            return
        spec = config.canary_spec
        assert spec is not None
        rank = record.plan.rank
        first = record.canary is None or record.canary.sent == 0
        for attempt in range(1, ATTEMPTS + 1):
            result = await _send(self._canary, config)
            record.record_canary(result)
            if self._observe is not None:
                self._observe(rank, result)
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
        self._idle.canary_sent(now)


def canary_exchange(
    config: CanarySettings, record: RankRecord, exchanges: ExchangeFactory
) -> RankExchange:
    """The rank's canary request, with its API key (see `api_key`) as a Bearer token."""
    spec = config.canary_spec
    assert spec is not None
    headers: list[tuple[str, str]] = []
    if spec.body is not None:
        headers.append(("Content-Type", "application/json"))
    key = api_key(record.plan.argv)
    if key is not None:
        headers.append(("Authorization", f"Bearer {key}"))
    return exchanges(record.plan.port, spec.method, spec.path, spec.body, tuple(headers))


# The timeout is part of the verdict (a slow canary is a failed one), not a cancel bound.
async def _send(canary: RankExchange, config: CanarySettings) -> CanaryResult:
    """One canary within `canary_timeout` seconds: a 2xx with its whole body is a success;
    a failure's answer is quoted (its start) in the error."""
    result, body = await canary.fetch(config.canary_timeout, MAX_ANSWER_BYTES)
    error = result.error
    if error is not None and result.status_code is not None and body:
        error += ": " + body[:_SHOWN].decode("utf-8", errors="replace").strip()
    return CanaryResult(result.ok, result.status_code, error, result.latency, time.time())
