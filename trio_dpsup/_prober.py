"""Health probing: one httpx client for all ranks, one probe loop per rank process, and the
startup deadline.

While a rank is starting it is probed every `startup_probe_interval` (tens of milliseconds),
so the supervisor is ready soon after the last rank answers 200. Once ready, it is probed
every `probe_interval`; `failure_threshold` consecutive failures raise `RankUnhealthy`.
Each rank's loop runs in that rank's own task (see _rank), so a rank whose health path
hangs delays no other rank's probes, and a restarted rank is probed from startup again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import NoReturn

import httpx
import trio

from ._config.config import RankScheme, SupervisorConfig
from ._errors import RankStartTimeout, RankUnhealthy, StartupTimeout, SupervisorFailure
from ._state import Board, ProbeResult, RankRecord
from ._tls import WILDCARD_HOSTS, rank_verify

__all__ = [
    "open_probe_client",
    "probe_once",
    "probe_rank",
    "rank_health_url",
    "run_startup_deadline",
]

logger = logging.getLogger(__name__)


def rank_health_url(config: SupervisorConfig, port: int, path: str | None = None) -> str:
    """The URL of `path` (default: the health path) on the rank that listens on `port`."""
    host = WILDCARD_HOSTS.get(config.host, config.host)
    if ":" in host:
        host = f"[{host}]"
    return f"{config.rank_scheme.value}://{host}:{port}{path or config.health_path}"


def open_probe_client(
    config: SupervisorConfig, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The one client every probe goes through (use it as an async context manager).

    `transport` replaces httpx's network transport (tests may pass a MockTransport).
    """
    verify = rank_verify(config) if config.rank_scheme is RankScheme.HTTPS else True
    # Probes must not go through an HTTP proxy from the environment: ranks are local.
    return httpx.AsyncClient(transport=transport, trust_env=False, verify=verify)


# The timeout is part of the verdict (a slow answer is a failed probe), not a cancel bound.
async def probe_once(client: httpx.AsyncClient, url: str, timeout: float) -> ProbeResult:  # noqa: ASYNC109
    """GET `url`; a 2xx within `timeout` seconds is healthy, anything else is a failure.

    **Cancellation**: safe; the request is abandoned.
    """
    start = trio.current_time()
    status_code: int | None = None
    error: str | None = None
    # One bound for the whole probe: httpx's own timeouts are per phase, not in total.
    with trio.move_on_after(timeout) as scope:
        try:
            response = await client.get(url)
            status_code = response.status_code
            if not response.is_success:
                error = f"HTTP {status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if scope.cancelled_caught:
        error = f"no answer within {timeout:g}s"
    latency = trio.current_time() - start
    return ProbeResult(ok=error is None, status_code=status_code, error=error, latency=latency)


async def probe_rank(
    config: SupervisorConfig,
    board: Board,
    record: RankRecord,
    client: httpx.AsyncClient,
    *,
    observe: Callable[[int, ProbeResult], None] | None = None,
    startup_timeout: float | None = None,
) -> NoReturn:
    """Probe one rank process: until its first 2xx (then mark it ready), and then until
    `failure_threshold` consecutive failures, raised as `RankUnhealthy`.

    `startup_timeout` bounds the first phase (`RankStartTimeout`); None leaves that to the
    supervisor's startup deadline. `observe(rank, result)` sees each probe of a ready rank.

    **Cancellation**: in-flight probes are abandoned; nothing needs cleaning up.
    """
    url = rank_health_url(config, record.plan.port)
    rank = record.plan.rank
    record.consecutive_failures = 0
    with trio.move_on_after(startup_timeout or math.inf) as startup:
        while True:  # startup: until the first 2xx
            record.last_probe = await probe_once(client, url, config.probe_timeout)
            if record.last_probe.ok:
                break
            await trio.sleep(config.startup_probe_interval)
    if startup.cancelled_caught:
        assert startup_timeout is not None
        raise RankStartTimeout(rank, startup_timeout)
    logger.info("rank %d is ready", rank, extra={"rank": rank})
    if board.mark_ready(record):
        logger.info("all %d ranks are ready", len(board.ranks))

    while True:  # ready: until failure_threshold consecutive failures; ends by cancellation
        await trio.sleep(config.probe_interval)
        record.last_probe = await probe_once(client, url, config.probe_timeout)
        if observe is not None:
            observe(rank, record.last_probe)
        if record.last_probe.ok:
            record.consecutive_failures = 0
            continue
        record.consecutive_failures += 1
        logger.warning(
            "rank %d failed a health probe (%d of %d): %s",
            rank,
            record.consecutive_failures,
            config.failure_threshold,
            record.last_probe.error,
            extra={"rank": rank},
        )
        if record.consecutive_failures >= config.failure_threshold:
            raise RankUnhealthy(rank, record.consecutive_failures, record.last_probe.error or "")


async def run_startup_deadline(
    config: SupervisorConfig,
    board: Board,
    fail: Callable[[SupervisorFailure], SupervisorFailure],
) -> None:
    """Fail the start (`StartupTimeout`, naming the ranks not ready) if not every rank is
    ready within `startup_timeout`; return once they are.

    **Cancellation**: prompt; nothing to clean up.
    """
    if config.startup_timeout <= 0:
        return
    with trio.move_on_after(config.startup_timeout):
        await board.all_ready.wait()
        return
    raise fail(StartupTimeout(config.startup_timeout, board.snapshot().not_ready()))
