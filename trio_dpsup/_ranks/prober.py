"""Health probing: one probe loop per rank process, and the startup deadline.

While a rank is starting it is probed every `startup_probe_interval` (tens of milliseconds),
so the supervisor is ready soon after the last rank answers 200. Once ready, it is probed
every `probe_interval`; `failure_threshold` consecutive failures raise `RankUnhealthy`.
After a ready rank's first failure it is suspect: confirmation probes start every
`suspect_interval` (overlapping, so that a hang is confirmed in about one probe timeout, not
threshold of them), until one answers 2xx or the threshold is reached; a single blip does not
fail a rank. An answer whose status is in `fail_on_status` fails it at once.

The ready ranks' probes share one clock (`Ticker`): one timer wakes every rank's loop at
each interval, and their answers come back in the same few epoll waits. Measured on 2
cores with 32 ranks, that took the CPU of a probe from about 470 µs (a timer per rank) to
125 µs (bench: "CPU of one probe"); through httpx it was about 1800 µs (as measured
when this client was asked for).

Probes go through `http_probe.HttpProbe`, a minimal HTTP/1.1 client on Trio's event loop (a
probe through httpx costs about four times the CPU); a test that injects an httpx
transport gets an httpx probe instead.
Each rank's loop runs in that rank's own task (see rank.py), so a rank whose health path
hangs delays no other rank's probes, and a restarted rank is probed from startup again.
"""

from __future__ import annotations

import logging
import math
import ssl
import sys
from collections.abc import Callable
from typing import NoReturn, Protocol

import httpx
import trio

from .._config.concerns import ProbeSettings, RankAddress
from .._config.enums import RankScheme
from .._config.tls import WILDCARD_HOSTS, rank_verify
from .._errors import RankStartTimeout, RankUnhealthy, StartupTimeout, SupervisorFailure
from .._state.board import Board, RankRecord
from .._state.status import ProbeResult, SupervisorStatus
from .http_probe import HttpProbe

__all__ = [
    "RankExchange",
    "RankProbe",
    "Ticker",
    "exchange_factory",
    "log_startup_progress",
    "open_probe_client",
    "probe_factory",
    "probe_once",
    "probe_rank",
    "run_startup_deadline",
    "startup_progress",
]


class RankProbe(Protocol):
    """GETs of one rank's health path."""

    async def probe(self, timeout: float) -> ProbeResult: ...  # noqa: ASYNC109

    async def aclose(self) -> None: ...


class RankExchange(Protocol):
    """One kind of request to one rank (a read of its metrics, a canary), made again and
    again: `fetch` sends it and returns the result and the body."""

    async def fetch(self, timeout: float, max_body: int) -> tuple[ProbeResult, bytes]: ...  # noqa: ASYNC109

    async def aclose(self) -> None: ...


#: What makes a `RankExchange`: (port, method, path, body, headers).
ExchangeFactory = Callable[
    [int, str, str, "bytes | None", tuple[tuple[str, str], ...]], RankExchange
]


class Ticker:
    """One clock for many loops: `wait` returns at the next tick.

    Ticks fall on a grid of Trio's clock, every multiple of `interval`, not `interval`
    after the last one: tickers whose intervals are multiples (the probes' every second,
    the metrics readings' every five, the tree watch's) tick in the same wake of the event
    loop, and none drifts from the others. A tick missed (a loop held up longer than an
    interval) is skipped, not caught up on.

    With `base`, a ticker whose interval is a whole multiple of the base's ticks on the
    base's ticks (every one, or one in so many), with no timer of its own: a timer's
    expiry is a cancellation in Trio, and at idle (py-spy, N = 8) the expiries of two
    timers a second cost more than the walk of the rank trees. Where the base
    misses the tick on this one's grid, this one ticks at the base's next. Another
    interval gets a timer of its own.

    **Cancellation**: `run` and `wait` are prompt.
    """

    def __init__(self, interval: float, base: Ticker | None = None) -> None:
        self.interval = interval
        self._tick = trio.Event()
        self._at = 0.0
        ratio = interval / base.interval if base is not None else 0.0
        whole = round(ratio) >= 1 and math.isclose(ratio, round(ratio), rel_tol=1e-9)
        #: The ticker whose ticks are this one's, and one in how many of them.
        self._base = base if whole else None
        self._every = round(ratio) if whole else 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self._base is not None and self._every == 1:
            return  # the base's ticks are this one's (see wait)
        last = math.floor(trio.current_time() / self.interval)  # the period we are in
        while True:  # ends by cancellation
            if self._base is None:
                at = next_tick(self.interval)
                await trio.sleep_until(at)
            else:
                # The first base tick of a new period of ours: the one on our grid, or the
                # next where the base missed that one (a missed tick delays a period, and
                # never drops it).
                index = round(await self._base.wait() / self._base.interval)
                period = index // self._every
                if period <= last:
                    continue
                at, last = period * self.interval, period
            tick, self._tick, self._at = self._tick, trio.Event(), at
            tick.set()

    async def wait(self) -> float:
        """Wait for the next tick; its time on the grid (periods counted from it are whole
        intervals, whatever the wake's delay)."""
        if self._base is not None and self._every == 1:
            return await self._base.wait()
        await self._tick.wait()
        return self._at


def next_tick(interval: float) -> float:
    """The next multiple of `interval` on Trio's clock."""
    return (math.floor(trio.current_time() / interval) + 1) * interval


class _HttpxProbe:
    """Probes through an httpx client: for tests that inject a transport."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self._client = client
        self._url = url

    async def probe(self, timeout: float) -> ProbeResult:  # noqa: ASYNC109
        return await probe_once(self._client, self._url, timeout)

    async def aclose(self) -> None:
        pass


class _HttpxExchange:
    """A `RankExchange` through an httpx client: for tests that inject a transport."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        body: bytes | None,
        headers: tuple[tuple[str, str], ...],
    ) -> None:
        self._client = client
        self._request = (method, url, body, dict(headers))

    async def fetch(self, timeout: float, max_body: int) -> tuple[ProbeResult, bytes]:  # noqa: ASYNC109
        method, url, body, headers = self._request
        start = trio.current_time()
        status: int | None = None
        error: str | None = None
        content = b""
        with trio.move_on_after(timeout) as scope:
            try:
                response = await self._client.request(
                    method, url, content=body, headers=headers, timeout=None
                )
                status, content = response.status_code, response.content
                if not response.is_success:
                    error = f"HTTP {status}"
                elif len(content) > max_body:
                    error = f"a body of {len(content)} bytes, more than {max_body}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if scope.cancelled_caught:
            error = f"no answer within {timeout:g}s"
        latency = trio.current_time() - start
        return ProbeResult(error is None, status, error, latency), content

    async def aclose(self) -> None:
        pass


def exchange_factory(
    address: RankAddress, client: httpx.AsyncClient, *, through_httpx: bool
) -> ExchangeFactory:
    """Makes the exchanges of the rank listening on a port (its metrics reads, its
    canary): through the native client, or (with an injected transport) `client`."""
    host = WILDCARD_HOSTS.get(address.host, address.host)
    tls = _tls_context(address) if address.rank_scheme is RankScheme.HTTPS else None

    def make(
        port: int,
        method: str,
        path: str,
        body: bytes | None,
        headers: tuple[tuple[str, str], ...],
    ) -> RankExchange:
        if through_httpx:
            return _HttpxExchange(client, method, address.url(port, path), body, headers)
        return HttpProbe(host, port, path, tls, method=method, body=body, headers=headers)

    return make


def probe_factory(
    address: RankAddress, client: httpx.AsyncClient, *, through_httpx: bool
) -> Callable[[int], RankProbe]:
    """Makes the probe of the rank listening on a port: the native client, or (with an
    injected transport) `client`."""
    if through_httpx:
        return lambda port: _HttpxProbe(client, address.url(port))
    host = WILDCARD_HOSTS.get(address.host, address.host)
    tls = _tls_context(address) if address.rank_scheme is RankScheme.HTTPS else None
    return lambda port: HttpProbe(host, port, address.health_path, tls)


def _tls_context(address: RankAddress) -> ssl.SSLContext:
    """The verification rules of rank_verify, as an SSL context."""
    verify = rank_verify(address.host, address.rank_ca_certs)
    if isinstance(verify, ssl.SSLContext):
        return verify
    context = ssl.create_default_context()
    if not verify:  # loopback: ranks hold self-signed certificates
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


logger = logging.getLogger(__name__)


def open_probe_client(
    address: RankAddress, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The one client every probe goes through (use it as an async context manager).

    `transport` replaces httpx's network transport (tests may pass a MockTransport).
    """
    verify: ssl.SSLContext | bool = True
    if address.rank_scheme is RankScheme.HTTPS:
        verify = rank_verify(address.host, address.rank_ca_certs)
    # Probes must not go through an HTTP proxy from the environment: ranks are local.
    return httpx.AsyncClient(transport=transport, trust_env=False, verify=verify)


# The timeout is part of the verdict (a slow answer is a failed probe), not a cancel bound.
async def probe_once(client: httpx.AsyncClient, url: str, timeout: float) -> ProbeResult:  # noqa: ASYNC109
    """GET `url`; a 2xx within `timeout` seconds is healthy, anything else is a failure.

    **Cancellation**: safe; the request is abandoned.
    """
    # The exchange's own request, without a body limit: a probe's body is read and dropped.
    exchange = _HttpxExchange(client, "GET", url, None, ())
    result, _ = await exchange.fetch(timeout, sys.maxsize)
    return result


async def probe_rank(
    config: ProbeSettings,
    board: Board,
    record: RankRecord,
    probe: RankProbe,
    ticker: Ticker,
    *,
    observe: Callable[[int, ProbeResult], None] | None = None,
    startup_timeout: float | None = None,
) -> NoReturn:
    """Probe one rank process: until its first 2xx (then mark it ready), and then until it
    fails (`RankUnhealthy`): `failure_threshold` failures in a row, confirmed quickly, or
    one answer whose status is in `fail_on_status`.

    `startup_timeout` bounds the first phase (`RankStartTimeout`); None leaves that to the
    supervisor's startup deadline. `observe(rank, result)` sees each probe of a ready rank.

    **Cancellation**: in-flight probes are abandoned; nothing needs cleaning up (the caller
    closes `probe`).
    """
    rank = record.plan.rank
    record.reset_probes()
    with trio.move_on_after(startup_timeout or math.inf) as startup:
        while True:  # startup: until the first 2xx
            result = await probe.probe(config.probe_timeout)
            record.record_probe(result)
            if result.ok:
                break
            await trio.sleep(config.startup_probe_interval)
    if startup.cancelled_caught:
        assert startup_timeout is not None
        raise RankStartTimeout(rank, startup_timeout)
    # Marked before it is said: whatever the record is read beside (the terminal's startup
    # line) already counts this rank.
    everyone = board.mark_ready(record)
    logger.info("rank %d is ready", rank, extra={"rank": rank})
    if everyone:
        logger.info("all %d ranks are ready", len(board.ranks))
    while True:  # ready: until it fails; ends by cancellation
        await ticker.wait()
        if record.probes_paused:
            continue  # an operator paused them (a weight reload...): see trio-dpsup ctl
        if not _count(config, record, await probe.probe(config.probe_timeout), observe):
            await _confirm(config, record, probe, observe)


def _count(
    config: ProbeSettings,
    record: RankRecord,
    result: ProbeResult,
    observe: Callable[[int, ProbeResult], None] | None,
) -> bool:
    """Record one probe of a ready rank; True if it was healthy. Raises RankUnhealthy at
    the threshold, or at once for a status in fail_on_status."""
    rank = record.plan.rank
    failures = record.record_probe(result)
    if observe is not None:
        observe(rank, result)
    if result.ok:
        return True
    error = result.error or ""
    if result.status_code is not None and config.fails_at_once(result.status_code):
        raise RankUnhealthy(rank, failures, f"{error} (--fail-on-status)")
    logger.warning(
        "rank %d failed a health probe (%d of %d): %s",
        rank,
        failures,
        config.failure_threshold,
        error,
        extra={"rank": rank},
    )
    if failures >= config.failure_threshold:
        raise RankUnhealthy(rank, failures, error)
    return False


async def _confirm(
    config: ProbeSettings,
    record: RankRecord,
    probe: RankProbe,
    observe: Callable[[int, ProbeResult], None] | None,
) -> None:
    """A suspect rank: start the probes that confirm or clear it, `suspect_interval` apart
    without waiting for each other's answers (so hangs are confirmed in about one timeout),
    until one is healthy (return) or the threshold is reached (RankUnhealthy)."""
    needed = config.failure_threshold - record.consecutive_failures
    send, receive = trio.open_memory_channel[ProbeResult](needed)

    async def one() -> None:
        await send.send(await probe.probe(config.probe_timeout))

    async def launch(nursery: trio.Nursery) -> None:
        for _ in range(needed):
            nursery.start_soon(one)
            await trio.sleep(config.suspect_interval)

    failed: RankUnhealthy | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(launch, nursery)
        for _ in range(needed):  # each probe answers within its timeout
            try:
                healthy = _count(config, record, await receive.receive(), observe)
            except RankUnhealthy as exc:
                failed = exc  # raised below: out of a nursery it would come in a group
                healthy = True
            if healthy:
                nursery.cancel_scope.cancel()  # decided: the other probes no longer matter
                break
    if failed is not None:
        raise failed


def startup_progress(status: SupervisorStatus, elapsed: float) -> str:
    """``3/8 ranks ready after 42s; waiting for 2, 5, 6, 7``."""
    waiting = status.not_ready()
    return (
        f"{len(status.ranks) - len(waiting)}/{len(status.ranks)} ranks ready after "
        f"{elapsed:.0f}s; waiting for {', '.join(map(str, waiting))}"
    )


async def log_startup_progress(config: ProbeSettings, board: Board) -> None:
    """Every `progress_log_interval` until every rank is ready (or shutdown begins): one
    record, `startup_progress`.

    **Cancellation**: prompt.
    """
    if not config.progress_log_interval:
        return
    while True:  # ends once every rank is ready or shutdown has begun
        await trio.sleep(config.progress_log_interval)
        if board.all_ready.is_set() or board.stopping.is_set():
            return
        logger.info(startup_progress(board.snapshot(), trio.current_time() - board.started_at))


async def run_startup_deadline(
    config: ProbeSettings,
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
