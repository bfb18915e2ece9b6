"""A closed-loop load generator: what users feel while ranks are drained, restarted, stopped
or crash, measured as requests that succeed or fail.

``clients`` tasks each send one OpenAI-style completion after another (``POST
/v1/completions``) to `url`, a router in front of the ranks or a rank itself, until the
block ends; every request is kept with its status, latency and the event windows it
overlapped::

    async with open_load(router_url, clients=4) as load:
        await load.settle()                     # a first success of each client
        with load.window("rolling restart"):
            ... # ctl rolling-restart
    assert load.failed() == [], load.summary()

A request fails when it gets no answer within `timeout`, an answer other than 200, or (when
streamed, every `stream_every`-th request) a stream that ends before ``data: [DONE]``. Each
request has a connection of its own (see `open_load`), so a failure is the server's.
Every loop is bounded: each client stops at the end of the block, after `max_requests`,
or at `max_seconds`, whichever comes first.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import trio

__all__ = ["Load", "LoadRequest", "open_load"]


@dataclass(frozen=True)
class LoadRequest:
    """One request the load sent."""

    client: int
    #: When it began (before its connection was made) and when its answer ended
    #: (trio.current_time()).
    started: float
    ended: float
    streamed: bool
    #: The HTTP status, or None when no answer came.
    status: int | None
    #: Why it failed; None when it succeeded.
    error: str | None
    #: The event windows (`Load.window`) it overlapped.
    windows: tuple[str, ...] = ()
    #: When its last byte was written to the server's socket; None if it never was.
    sent: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency(self) -> float:
        return self.ended - self.started


@dataclass
class Load:
    """The requests of one `open_load` block, and its event windows."""

    requests: list[LoadRequest] = field(default_factory=list)
    #: Event name -> (start, end); end is None while the window is open.
    windows: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    _progress: trio.Event = field(default_factory=trio.Event)

    @contextlib.contextmanager
    def window(self, name: str) -> Iterator[None]:
        """Mark an event (a restart, a SIGTERM...): requests that overlap it carry `name`."""
        self.windows[name] = (trio.current_time(), None)
        try:
            yield
        finally:
            self.windows[name] = (self.windows[name][0], trio.current_time())

    def failed(self, window: str | None = None) -> list[LoadRequest]:
        """The failed requests, of all or of those in `window`."""
        return [r for r in self.requests if not r.ok and (window is None or window in r.windows)]

    def succeeded(self, window: str | None = None) -> list[LoadRequest]:
        return [r for r in self.requests if r.ok and (window is None or window in r.windows)]

    def latency_quantile(self, q: float, window: str | None = None) -> float | None:
        """The `q` quantile (0-1) of the latency of the successful requests (of `window`)."""
        values = sorted(r.latency for r in self.succeeded(window))
        if not values:
            return None
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

    def summary(self) -> str:
        """One line per window, and the failures: for an assertion's message."""
        lines = [f"{len(self.requests)} requests, {len(self.failed())} failed"]
        for name in self.windows:
            p99 = self.latency_quantile(0.99, name)
            lines.append(
                f"  {name}: {len(self.succeeded(name))} ok, {len(self.failed(name))} failed, "
                f"p99 {'-' if p99 is None else f'{p99:.3f}s'}"
            )
        lines += [f"  failed: client {r.client}: {r.error}" for r in self.failed()[:10]]
        return "\n".join(lines)

    async def settle(self, count: int = 1, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """Wait until `count` requests have succeeded (the load is flowing).

        **Cancellation**: safe."""
        with trio.fail_after(timeout):
            while len(self.succeeded()) < count:
                await self._progress.wait()

    def _add(self, request: LoadRequest) -> None:
        self.requests.append(request)
        self._progress.set()
        self._progress = trio.Event()

    def _windows_of(self, started: float, ended: float) -> tuple[str, ...]:
        return tuple(
            name
            for name, (start, end) in self.windows.items()
            if started <= (ended if end is None else end) and ended >= start
        )


@contextlib.asynccontextmanager
async def open_load(
    url: str,
    *,
    clients: int = 4,
    model: str = "model",
    prompt: str = "Tell me a story about a supervisor.",
    max_tokens: int = 16,
    stream_every: int = 3,
    timeout: float = 20.0,  # noqa: ASYNC109 (a request's verdict, not this call's)
    max_requests: int = 100_000,
    max_seconds: float = 900.0,
    extra: dict[str, object] | None = None,
) -> AsyncIterator[Load]:
    """Run the load against `url` while the block runs; the `Load` holds every request.

    Each client sends `max_tokens`-token completions one after another, every
    `stream_every`-th one streamed (0: none). On leaving the block, the requests in flight
    are let finish (each bounded by `timeout`) and counted.

    **Cancellation**: the clients stop; requests in flight are abandoned, not counted.
    """
    load = Load()
    stop = trio.Event()
    # A new connection per request: servers close idle keep-alive connections (llama-server
    # after 100 requests or 5 s), and a client that reuses one just as it closes sees
    # "disconnected without a response", a race of its own pool that says nothing of the
    # ranks (measured: 1 in 230 requests straight to llama-server, 28 in 949 through
    # HAProxy, with no event at all). Real clients retry it; this one avoids it.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=url.rstrip("/"), trust_env=False, timeout=timeout, limits=limits
    ) as http:

        async def client(index: int) -> None:
            with trio.move_on_after(max_seconds):
                for n in range(max_requests):
                    if stop.is_set():
                        return
                    streamed = stream_every > 0 and n % stream_every == stream_every - 1
                    body = {
                        "model": model,
                        "prompt": f"{prompt} ({index}.{n})",
                        "max_tokens": max_tokens,
                        "stream": streamed,
                        **(extra or {}),
                    }
                    load._add(await _one(http, index, body, streamed, timeout, load))

        async with trio.open_nursery() as nursery:
            for index in range(clients):
                nursery.start_soon(client, index)
            try:
                yield load
            finally:
                stop.set()


async def _one(
    http: httpx.AsyncClient,
    index: int,
    body: dict[str, object],
    streamed: bool,
    timeout: float,  # noqa: ASYNC109
    load: Load,
) -> LoadRequest:
    started = trio.current_time()
    status: int | None = None
    error: str | None = None
    sent: list[float] = []

    async def trace(event: str, info: dict[str, object]) -> None:
        if event == "http11.send_request_body.complete":
            sent.append(trio.current_time())

    try:
        with trio.fail_after(timeout):
            request = http.build_request(
                "POST", "/v1/completions", json=body, extensions={"trace": trace}
            )
            async with contextlib.aclosing(await http.send(request, stream=True)) as response:
                status = response.status_code
                data = await response.aread()
        if status != 200:
            error = f"status {status}: {data[:200]!r}"
        elif streamed and b"data: [DONE]" not in data:
            error = "the stream ended before data: [DONE]"
        elif not streamed and "choices" not in json.loads(data):
            error = f"no choices in {data[:200]!r}"
    except trio.TooSlowError:
        error = f"no answer within {timeout:g}s"
    except (httpx.HTTPError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    ended = trio.current_time()
    windows = load._windows_of(started, ended)
    return LoadRequest(
        index, started, ended, streamed, status, error, windows, sent[0] if sent else None
    )
