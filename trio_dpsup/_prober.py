"""The prober: one httpx client, one probe loop per rank, and the startup deadline.

While a rank is starting it is probed every `startup_probe_interval` (tens of milliseconds),
so the supervisor is ready soon after the last rank answers 200. Once ready, it is probed
every `probe_interval`; `failure_threshold` consecutive failures raise `RankUnhealthy`.
Each rank has its own loop, so a rank whose health path hangs delays no other rank's probes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx
import trio

from ._config import SupervisorConfig
from ._errors import RankUnhealthy, StartupTimeout, SupervisorFailure
from ._state import Board, ProbeResult, RankRecord, RankState
from ._tls import rank_verify

__all__ = ["run_prober"]

logger = logging.getLogger(__name__)

#: Hosts that mean "every interface": a rank bound there is probed on loopback.
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def rank_health_url(config: SupervisorConfig, port: int) -> str:
    host = _WILDCARD_HOSTS.get(config.host, config.host)
    if ":" in host:
        host = f"[{host}]"
    return f"{config.rank_scheme}://{host}:{port}{config.health_path}"


async def run_prober(
    config: SupervisorConfig,
    board: Board,
    *,
    fail: Callable[[SupervisorFailure], SupervisorFailure],
    transport: httpx.AsyncBaseTransport | None = None,
    observe: Callable[[int, ProbeResult], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Probe every rank until cancelled; raise the first RankUnhealthy or StartupTimeout.

    `transport` replaces httpx's network transport (tests may pass a MockTransport).
    `observe(rank, result)` is called with each probe of a ready rank (for /metrics).

    **Cancellation**: in-flight probes are abandoned; nothing needs cleaning up.
    """
    verify = rank_verify(config) if config.rank_scheme == "https" else True
    # Probes must not go through an HTTP proxy from the environment: ranks are local.
    async with (
        httpx.AsyncClient(transport=transport, trust_env=False, verify=verify) as client,
        trio.open_nursery() as nursery,
    ):
        for record in board.ranks:
            nursery.start_soon(_probe_rank, config, board, record, client, fail, observe)
        if config.startup_timeout > 0:
            nursery.start_soon(_startup_deadline, config, board, fail)
        task_status.started()


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


async def _probe_rank(
    config: SupervisorConfig,
    board: Board,
    record: RankRecord,
    client: httpx.AsyncClient,
    fail: Callable[[SupervisorFailure], SupervisorFailure],
    observe: Callable[[int, ProbeResult], None] | None,
) -> None:
    url = rank_health_url(config, record.plan.port)
    while True:  # startup: until the first 2xx; bounded by the startup deadline
        record.last_probe = await probe_once(client, url, config.probe_timeout)
        if record.last_probe.ok:
            break
        await trio.sleep(config.startup_probe_interval)
    logger.info("rank %d is ready", record.plan.rank, extra={"rank": record.plan.rank})
    if board.mark_ready(record):
        logger.info("all %d ranks are ready", len(board.ranks))

    while True:  # ready: until failure_threshold consecutive failures; ends by cancellation
        await trio.sleep(config.probe_interval)
        record.last_probe = await probe_once(client, url, config.probe_timeout)
        if observe is not None:
            observe(record.plan.rank, record.last_probe)
        if record.last_probe.ok:
            record.consecutive_failures = 0
            continue
        record.consecutive_failures += 1
        logger.warning(
            "rank %d failed a health probe (%d of %d): %s",
            record.plan.rank,
            record.consecutive_failures,
            config.failure_threshold,
            record.last_probe.error,
            extra={"rank": record.plan.rank},
        )
        if record.consecutive_failures >= config.failure_threshold:
            record.state = RankState.FAILED
            raise fail(
                RankUnhealthy(
                    record.plan.rank, record.consecutive_failures, record.last_probe.error or ""
                )
            )


async def _startup_deadline(
    config: SupervisorConfig,
    board: Board,
    fail: Callable[[SupervisorFailure], SupervisorFailure],
) -> None:
    with trio.move_on_after(config.startup_timeout):
        await board.all_ready.wait()
        return
    raise fail(StartupTimeout(config.startup_timeout, board.snapshot().not_ready()))
