"""The router feed (``--router KIND=URL``): each router's worker list holds exactly the
ranks that serve, as the router's own listing confirms.

One task per router keeps it in step with the board: at every change, the ranks that take
traffic (`SupervisorStatus.takes_traffic`: ready, not drained or draining, no shutdown
begun) are the ones it should list; the others of ours are removed (a failure and a planned
stop alike: the moment a rank leaves the board's traffic, before anything slow). Each change
is confirmed by reading the router's listing again, at most ``--router-timeout``; what the
listing shows is on the board (``RouterStatus.listed``), which a drain waits on. Workers the
router lists that are not ours (another node's ranks) are never touched. At exit every rank
of ours is removed.

A router that is down, slow or answers garbage never stops the supervisor and never
changes /ready: the exchange is retried with backoff and jitter, the problem is in /status
(``routers``) and counted (``trio_dpsup_router_errors_total``), and logged once per outage.

Only sgl-router is a kind for now (`SglangWorkers`); another is one more class with the
three calls of `RouterWorkers`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import httpx
import trio

from .._config.concerns import PublishSettings
from .._config.routers import RouterKind, RouterSpec
from .._state.board import Board

__all__ = ["RouterWorkers", "SglangWorkers", "feed_routers", "rank_url"]

logger = logging.getLogger(__name__)

#: Between reads of a router's listing while a change is being confirmed.
CONFIRM_POLL = 0.05
#: After a failed exchange: the first wait, doubled up to the second (with jitter).
RETRY_BACKOFF = (0.1, 5.0)


class RouterWorkers(Protocol):
    """One router's worker API."""

    async def listed(self) -> dict[str, str]:
        """The workers it lists: URL -> its id for them."""
        ...

    async def add(self, url: str) -> None: ...

    async def remove(self, url: str, worker_id: str) -> None: ...


class SglangWorkers:
    """sgl-router's worker API (sgl-project/sglang, sgl-router/src/server.rs and
    src/protocols/worker_spec.rs; the version the tests pin is sglang-router 0.3.2):
    ``POST /workers`` with ``{"url": ...}`` and ``DELETE /workers/{worker_id}`` answer 202
    ("queued for background processing"), so each is confirmed by ``GET /workers``, whose
    ``workers`` each carry ``id`` and ``url``."""

    def __init__(self, base: str, client: httpx.AsyncClient) -> None:
        self._base = base
        self._client = client

    async def listed(self) -> dict[str, str]:
        response = await self._client.get(f"{self._base}/workers")
        response.raise_for_status()
        document: Any = response.json()
        return {str(w["url"]).rstrip("/"): str(w["id"]) for w in document["workers"]}

    async def add(self, url: str) -> None:
        response = await self._client.post(f"{self._base}/workers", json={"url": url})
        response.raise_for_status()

    async def remove(self, url: str, worker_id: str) -> None:
        response = await self._client.delete(f"{self._base}/workers/{worker_id}")
        if response.status_code != 404:  # gone already
            response.raise_for_status()


def rank_url(config: PublishSettings, port: int) -> str:
    """A rank's URL as routers are given it: --advertise-host (else --host) and its port."""
    host = config.advertised_host
    host = f"[{host}]" if ":" in host else host
    return f"{config.rank_scheme.value}://{host}:{port}"


def _client_for(spec: RouterSpec, client: httpx.AsyncClient) -> RouterWorkers:
    if spec.kind is RouterKind.SGLANG:
        return SglangWorkers(spec.url, client)
    raise AssertionError(spec.kind)  # every kind has a client


class _Unconfirmed(Exception):
    """The router's listing did not show a change within --router-timeout."""


async def feed_routers(
    config: PublishSettings,
    board: Board,
    stop: Callable[[], Awaitable[object]],
) -> None:
    """Feed every router of ``config.routers`` until `stop` returns; then take every rank
    of ours out of each, bounded by --router-timeout.

    **Cancellation**: prompt; the final removal is skipped (the routers' health checks
    remain).
    """
    if not config.routers:
        return
    done = trio.Event()
    timeout = httpx.Timeout(config.router_timeout)
    async with (
        httpx.AsyncClient(trust_env=False, timeout=timeout) as client,
        trio.open_nursery() as nursery,
    ):

        async def wait_stop() -> None:
            await stop()
            done.set()

        nursery.start_soon(wait_stop)
        for spec in config.router_specs:
            feed = _Feed(config, board, spec, _client_for(spec, client), done)
            nursery.start_soon(feed.run)


class _Feed:
    """Keeps one router in step with the board."""

    def __init__(
        self,
        config: PublishSettings,
        board: Board,
        spec: RouterSpec,
        workers: RouterWorkers,
        done: trio.Event,
    ) -> None:
        self._config = config
        self._board = board
        self._name = str(spec)
        self._workers = workers
        self._done = done
        #: Every rank of ours, by its URL: the only workers this feed touches.
        self._ours = {rank_url(config, r.plan.port): r.plan.rank for r in board.ranks}
        self._status = board.routers[self._name]
        self._failures = 0  # in a row

    async def run(self) -> None:
        while True:
            final = self._done.is_set()
            version = self._board.version
            try:
                await self._sync()
            except Exception as exc:  # whatever a router does, it never stops the supervisor
                self._failed(exc)
                if final:
                    return
                await self._sleep(self._backoff())
                continue
            if final:
                return
            await self._until_changed(version)

    def _wanted(self) -> set[str]:
        """The URLs the router should list now: none once stopping for good."""
        if self._done.is_set():
            return set()
        status = self._board.snapshot()
        return {rank_url(self._config, r.port) for r in status.ranks if status.takes_traffic(r)}

    async def _sync(self) -> None:
        """Until the router's listing shows exactly the wanted ranks among ours: add what is
        wanted and missing, remove what is ours and unwanted. The wanted set is read afresh
        at each turn, so a rank taken out while an earlier change is still being confirmed
        (a slow registration) is removed at once, not after it. Each turn's listing is put
        on the board, where drains wait for it. Raises _Unconfirmed when the listing does
        not match within --router-timeout of the last change wanted."""
        timeout = self._config.router_timeout
        added: set[str] = set()
        removed: set[str] = set()
        wanted: set[str] | None = None
        deadline = 0.0
        while True:
            now_wanted = self._wanted()
            if now_wanted != wanted:
                wanted, deadline = now_wanted, trio.current_time() + timeout
                added &= wanted
                removed -= wanted
            with trio.move_on_after(timeout) as bound:  # a slow router is a failed exchange
                listed = self._of_ours(await self._workers.listed())
                for url in sorted(wanted - listed.keys() - added):
                    await self._workers.add(url)
                    added.add(url)
                for url in sorted(listed.keys() - wanted - removed):
                    await self._workers.remove(url, listed[url])
                    removed.add(url)
            if bound.cancelled_caught:
                raise _Unconfirmed(f"no answer within --router-timeout {timeout:g}s")
            self._record(listed)
            if listed.keys() == wanted:
                return
            if trio.current_time() > deadline:
                raise _Unconfirmed(
                    f"its listing did not show the change within --router-timeout {timeout:g}s"
                )
            # The router's jobs run in the background: its listing is the only word on when
            # they are done, so it is read again until it shows them (no event exists).
            await trio.sleep(CONFIRM_POLL)

    def _of_ours(self, listed: dict[str, str]) -> dict[str, str]:
        return {url: wid for url, wid in listed.items() if url in self._ours}

    def _record(self, listed: dict[str, str]) -> None:
        ranks = tuple(sorted(self._ours[url] for url in listed))
        if self._failures:
            logger.info(
                "router %s answers again, after %d failed exchange(s)", self._name, self._failures
            )
            self._failures = 0
        self._status = dataclasses.replace(self._status, listed=ranks, problem=None)
        self._board.set_router(self._status)

    def _failed(self, exc: Exception) -> None:
        problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self._failures == 0:
            logger.warning(
                "router %s: %s: retrying with backoff (it never stops the supervisor or "
                "changes /ready)",
                self._name,
                problem,
            )
        self._failures += 1
        errors = self._status.errors + 1
        self._status = dataclasses.replace(self._status, problem=problem, errors=errors)
        self._board.set_router(self._status)

    def _backoff(self) -> float:
        low, high = RETRY_BACKOFF
        ceiling = min(high, low * 2 ** min(self._failures, 16))
        return random.uniform(ceiling / 2, ceiling)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but end early at the stop (the final removal goes out at once)."""
        with trio.move_on_after(seconds):
            await self._done.wait()

    async def _until_changed(self, version: int) -> None:
        """Return at the next change of the board after `version`, or at the stop."""
        if self._board.version != version:
            return
        async with trio.open_nursery() as nursery:

            async def changed() -> None:
                await self._board.changed.wait()
                nursery.cancel_scope.cancel()

            async def done() -> None:
                await self._done.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(changed)
            nursery.start_soon(done)
