"""The control plane's HTTP/1.1 server: h11 on Trio streams, with a cap on connections.

Why not a general ASGI server: a probe endpoint must answer while a client holds thousands
of idle keep-alive connections. Hypercorn's Trio worker builds its listeners inside
`worker_serve` and offers no hook to refuse or evict a connection, so under the common soft
limit of 1024 open files idle connections made accept fail and probes went unanswered.
Here every connection is counted; at `max_connections` the least recently active one is
closed to make room, so a new connection — a probe — is always served. Idle connections
are closed after `IDLE_TIMEOUT`, and a request must arrive whole within it, its body too
(slow clients hold no slot for long); a body larger than `MAX_BODY` is refused (413) and
the connection closed, and an answer the client does not read within `IDLE_TIMEOUT`
closes the connection (a pipelining client that never reads). GET and HEAD answers are
small and computed in one call.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11
import trio

__all__ = ["IDLE_TIMEOUT", "Response", "serve_http"]

logger = logging.getLogger(__name__)

#: Seconds a kept-alive connection may stay idle, and a request may take to arrive.
IDLE_TIMEOUT = 5.0
#: The largest request head accepted (probes send a few hundred bytes).
MAX_HEAD = 16384
#: The largest request body accepted, and dropped: no endpoint takes one.
MAX_BODY = 1024
_READ = 16384


@dataclass(frozen=True)
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


#: Answers (method, target): the target as sent, query included. May wait (a long poll).
Handler = Callable[[str, str], Awaitable[Response]]


@dataclass(eq=False)
class _Connection:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    last_active: float = field(default_factory=trio.current_time)


class _Connections:
    """The open connections, and eviction of the least recently active at the cap."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: set[_Connection] = set()

    def admit(self) -> _Connection:
        if len(self._open) >= self.limit:
            oldest = min(self._open, key=lambda c: c.last_active)
            oldest.scope.cancel()
            self._open.discard(oldest)
        connection = _Connection()
        self._open.add(connection)
        return connection

    def close(self, connection: _Connection) -> None:
        self._open.discard(connection)


async def serve_http(
    handler: Handler,
    listener: trio.abc.Listener[trio.abc.Stream],
    shutdown_trigger: Callable[[], Awaitable[object]],
    *,
    max_connections: int,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler(method, path)` on `listener` until `shutdown_trigger` returns.

    **Cancellation**: stops at once, closing every connection.
    """
    connections = _Connections(max_connections)
    try:
        await _serve_listener(handler, listener, shutdown_trigger, connections, task_status)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()


async def _serve_listener(
    handler: Handler,
    listener: trio.abc.Listener[trio.abc.Stream],
    shutdown_trigger: Callable[[], Awaitable[object]],
    connections: _Connections,
    task_status: trio.TaskStatus[None],
) -> None:
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # EMFILE and the like: the cap should prevent it; wait rather than spin.
                    logger.warning("control plane: accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(_serve_connection, handler, stream, connections)

        nursery.start_soon(accept)
        task_status.started()
        await shutdown_trigger()
        nursery.cancel_scope.cancel()


async def _serve_connection(
    handler: Handler, stream: trio.abc.Stream, connections: _Connections
) -> None:
    connection = connections.admit()
    try:
        with connection.scope:
            await _serve(handler, stream, connection)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
        pass  # the client went away or spoke no TLS: nothing to answer
    finally:
        connections.close(connection)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


async def _serve(handler: Handler, stream: trio.abc.Stream, connection: _Connection) -> None:
    http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    while True:
        event = await _next_event(http, stream, connection)
        if event is None:
            return
        if isinstance(event, h11.Request):
            refusal = await _skip_body(http, stream, connection, event)
            if refusal is not None:
                # The rest of the body is never read: answer, then close.
                await _send(http, stream, refusal, head=False)
                return
            method = event.method.decode("ascii", "replace")
            target = event.target.decode("ascii", "replace")
            response = await handler(method, target)
            await _send(http, stream, response, head=method == "HEAD")
        if http.our_state is h11.MUST_CLOSE or http.their_state is h11.MUST_CLOSE:
            return
        try:
            http.start_next_cycle()
        except h11.LocalProtocolError:
            return
        connection.last_active = trio.current_time()


async def _skip_body(
    http: h11.Connection, stream: trio.abc.Stream, connection: _Connection, request: h11.Request
) -> Response | None:
    """Read and drop the request's body (no endpoint takes one); a refusal to send instead
    when it is larger than MAX_BODY (413, also when only announced) or takes longer than
    IDLE_TIMEOUT in all to arrive (408): a body trickled a byte at a time, or an endless
    chunked one, must not hold a connection or a core."""
    for name, value in request.headers:
        if name == b"content-length" and int(value) > MAX_BODY:
            return _refusal(413, f"a request body is at most {MAX_BODY} bytes here")
    received = 0
    with trio.move_on_after(IDLE_TIMEOUT):
        while True:
            event = await _next_event(http, stream, connection)
            if isinstance(event, h11.EndOfMessage):
                return None
            if not isinstance(event, h11.Data):
                # Closed, or a protocol error (answered already): nothing more to answer.
                raise trio.ClosedResourceError("the client went away mid-request")
            received += len(event.data)
            if received > MAX_BODY:
                return _refusal(413, f"a request body is at most {MAX_BODY} bytes here")
    return _refusal(408, f"the request body did not arrive within {IDLE_TIMEOUT:g}s")


def _refusal(status: int, text: str) -> Response:
    headers = [(b"content-type", b"text/plain"), (b"connection", b"close")]
    return Response(status, headers, f"{text}\n".encode())


async def _next_event(
    http: h11.Connection, stream: trio.abc.Stream, connection: _Connection
) -> h11.Event | None:
    """The next event, or None when the client closed, timed out or broke the protocol."""
    with trio.move_on_after(IDLE_TIMEOUT):
        while True:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                await _reject(http, stream, exc)
                return None
            if event is h11.NEED_DATA:
                data = await stream.receive_some(_READ)
                connection.last_active = trio.current_time()
                http.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Event) and not isinstance(event, h11.ConnectionClosed):
                return event
            return None  # closed, or PAUSED (a pipelined request after a close)
    return None


async def _reject(
    http: h11.Connection, stream: trio.abc.Stream, exc: h11.RemoteProtocolError
) -> None:
    if http.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    status = exc.error_status_hint or 400
    body = f"bad request: {exc}\n".encode()
    await _send(
        http, stream, Response(status, [(b"content-type", b"text/plain")], body), head=False
    )


async def _send(
    http: h11.Connection, stream: trio.abc.Stream, response: Response, *, head: bool
) -> None:
    headers = [(b"content-length", str(len(response.body)).encode()), *response.headers]
    data = http.send(h11.Response(status_code=response.status, headers=headers))
    if not head and response.body:
        data = (data or b"") + (http.send(h11.Data(data=response.body)) or b"")
    data = (data or b"") + (http.send(h11.EndOfMessage()) or b"")
    # A client that sends requests and never reads the answers would hold the connection
    # (and a pipelined backlog) for good: the answer goes out within IDLE_TIMEOUT, or the
    # connection is closed.
    with trio.move_on_after(IDLE_TIMEOUT) as sending:
        await stream.send_all(data)
    if sending.cancelled_caught:
        raise trio.ClosedResourceError("the client did not read its answer")
