"""The health probe's HTTP client: one GET, as cheap as it can be, on Trio's event loop.

A probe is the supervisor's most frequent work (every rank, every interval). Through httpx
one keep-alive GET cost 1.8 ms of CPU, against 0.46 ms as raw bytes on Trio streams (as
measured when this client was asked for; the bench measures what a probe costs now).
This client does the one thing a probe needs: send a fixed GET, read the status
line and headers (at most MAX_HEADER bytes), read and discard the body (Content-Length,
chunked, or to EOF; at most MAX_BODY bytes), and keep the connection for the next probe.
Any error, a timeout, a body too large or ``Connection: close`` drops the connection: the
next probe opens a new one. A kept connection the server has closed meanwhile (llama-server
closes one idle for 5 s: measured, build 11434) fails before any byte of an answer: the
request is sent again, once, on a new connection, within the same timeout; a failure on a
new connection is the rank's. HTTPS goes through `trio.SSLStream` with the context the prober
verifies ranks with (see _config.tls.rank_verify).

A plain TCP connection is a socket driven through `trio.lowlevel` (`_Plain`), not a
`trio.SocketStream`, and the timeout is a deadline that a cancel scope enforces only around
a wait that must block. At idle nearly every exchange blocks on nothing: the request goes out
in one send, and by the time the task runs again (after one schedule point, while the other
ranks' probes of the same tick are sent) the answer is there. Trio's stream layers and a
cancel scope entered and left per exchange are pure Python; without them a probe costs
111 µs of CPU against 117 (`python -m bench.idle_parts`, medians of 5, 2 cores; the rest is
the kernel's loopback and the event loop). The deadline is the rank's, not the loop's: an
answer that is there when the supervisor gets to it is not late because the supervisor was.

Probes of one rank may overlap (confirmation probes, see prober.py): each takes an idle
connection or opens its own, and gives it back when it is still good.

The same client makes the supervisor's other small exchanges with a rank, at the same low
cost: the reads of its /metrics (`fetch` keeps the body, up to a bound) and the canary (a
POST with a JSON body and its headers).

Parsing by hand is kept only while it agrees with h11: tests/test_probe_parser.py feeds it
responses as h11 writes them (chunked or not, odd but legal headers, cut at any read
boundary) and checks status and keep-alive against h11's own client (hypothesis).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from .._state.status import ProbeResult

__all__ = ["MAX_BODY", "MAX_HEADER", "HttpProbe", "ProbeError"]

#: Bytes of status line and headers accepted; more is a failed probe.
MAX_HEADER = 64 * 1024
#: Bytes of body read and discarded; more is a failed probe (a health path is small).
MAX_BODY = 1024 * 1024
_READ = 64 * 1024
#: Idle connections kept per rank: one for the interval's probe, more only while probes
#: overlap.
_IDLE = 4


class ProbeError(Exception):
    """The answer could not be read as HTTP/1.x."""


class Unanswered(ProbeError):
    """The connection ended before any byte of an answer."""


class _Late(Exception):
    """The exchange's deadline passed in a wait (its connection is mid-exchange)."""


class _Receiver(Protocol):
    """What the response parser reads from (a connection; in tests, a scripted stream)."""

    async def receive_some(self, max_bytes: int) -> bytes | bytearray: ...


class _Connection(_Receiver, Protocol):
    """A kept connection to a rank: what an exchange needs of it. Its waits end at
    `deadline` (`_Late`); `close` closes at once, without an await."""

    deadline: float

    async def send_all(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class _Plain:
    """A TCP connection as a non-blocking socket and `trio.lowlevel` waits: a send that
    fits the socket's buffer and a read of an answer already there enter no cancel scope
    and register nothing with the event loop (see the module's docstring).

    `receive_some` is a schedule point (a read right after a send finds the answer there
    only once the rank has had a turn to write it); `send_all` is one only when it blocks.
    """

    __slots__ = ("_sock", "deadline")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.deadline = 0.0

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self._sock.send(view) :]
            except BlockingIOError:
                await self._wait(trio.lowlevel.wait_writable)

    async def receive_some(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint()
        while True:
            try:
                return self._sock.recv(max_bytes)
            except BlockingIOError:
                await self._wait(trio.lowlevel.wait_readable)

    async def _wait(self, until_ready: Callable[[socket.socket], Awaitable[None]]) -> None:
        with trio.move_on_at(self.deadline) as scope:
            await until_ready(self._sock)
        if scope.cancelled_caught:
            raise _Late

    def close(self) -> None:
        trio.lowlevel.notify_closing(self._sock)  # wakes a wait on it, as Trio's own close
        self._sock.close()


class _Tls:
    """An HTTPS connection: a `trio.SSLStream`, each operation under the deadline (a
    cancel scope each: its operations are schedule points that check it, so here an
    answer there after the deadline is late)."""

    __slots__ = ("_stream", "deadline")

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self._stream = stream
        self.deadline = 0.0

    async def send_all(self, data: bytes) -> None:
        with trio.move_on_at(self.deadline) as scope:
            await self._stream.send_all(data)
        if scope.cancelled_caught:
            raise _Late

    async def receive_some(self, max_bytes: int) -> bytes | bytearray:
        with trio.move_on_at(self.deadline):
            return await self._stream.receive_some(max_bytes)
        raise _Late

    def close(self) -> None:
        # A health check owes its server no TLS close_notify, and a cancelled probe may
        # not await: the socket is closed at once.
        self._stream.transport_stream.socket.close()


class HttpProbe:
    """GET `path` on `host`:`port` (TLS when `tls` is given), one connection kept alive.

    `probe` never raises for the rank's faults: they are its ProbeResult.
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        tls: ssl.SSLContext | None = None,
        *,
        method: str = "GET",
        body: bytes | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        authority = f"[{host}]" if ":" in host else host
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
        if body is not None:
            extra += f"Content-Length: {len(body)}\r\n"
        self._request = (
            f"{method} {path} HTTP/1.1\r\nHost: {authority}:{port}\r\n"
            f"User-Agent: trio-dpsup\r\nAccept: */*\r\n{extra}\r\n"
        ).encode() + (body or b"")
        self._idle: list[_Connection] = []

    async def probe(self, timeout: float) -> ProbeResult:  # noqa: ASYNC109
        """One GET within `timeout` seconds (a verdict, not a cancel bound): a 2xx is
        healthy; another status, an error or no answer in time is a failure.

        **Cancellation**: safe; the connection in use is dropped.
        """
        return await self._exchange(timeout, None, MAX_BODY)

    async def fetch(self, timeout: float, max_body: int) -> tuple[ProbeResult, bytes]:  # noqa: ASYNC109
        """One request within `timeout` seconds, as `probe`, and its body (at most
        `max_body` bytes: a longer one is a failure).

        **Cancellation**: safe; the connection in use is dropped.
        """
        body = bytearray()
        result = await self._exchange(timeout, body, max_body)
        return result, bytes(body)

    async def _exchange(
        self,
        timeout: float,  # noqa: ASYNC109
        body: bytearray | None,
        max_body: int,
    ) -> ProbeResult:
        start = trio.current_time()
        deadline = start + timeout
        status: int | None = None
        error: str | None = None
        connection: _Connection | None = None
        keep = False
        try:
            for attempt in range(2):  # again, once, after a kept connection went stale
                reused = attempt == 0 and bool(self._idle)
                try:
                    connection = self._idle.pop() if reused else await self._connect(deadline)
                    connection.deadline = deadline
                    await connection.send_all(self._request)
                    status, keep = await _read_response(connection, body, max_body)
                    if not 200 <= status < 300:
                        error = f"HTTP {status}"
                except _Late:
                    error = f"no answer within {timeout:g}s"
                    keep = False
                except (
                    OSError,
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    Unanswered,
                ) as exc:
                    if reused and connection is not None and not body:
                        connection.close()  # closed by the server while it idled: again
                        connection = None
                        continue
                    error = _describe(exc)
                except (ProbeError, ssl.SSLError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                break
        except BaseException:
            # Cancelled from outside (a confirmation no longer needed, a stop): the
            # connection is mid-answer, and no await may run now. Drop it at once.
            if connection is not None:
                connection.close()
            raise
        if connection is not None:
            if keep:  # the whole answer was read, and the server keeps the connection
                self._keep(connection)
            else:
                connection.close()
        return ProbeResult(
            ok=error is None, status_code=status, error=error, latency=trio.current_time() - start
        )

    async def aclose(self) -> None:
        """Close the idle connections. **Cancellation**: safe."""
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    async def _connect(self, deadline: float) -> _Connection:
        with trio.move_on_at(deadline):
            tcp = await trio.open_tcp_stream(self._host, self._port)  # TCP_NODELAY: Trio's
            if self._tls is None:
                sock = socket.socket(fileno=tcp.socket.detach())
                # Non-blocking whatever socket.setdefaulttimeout an embedding program set:
                # a socket made from a descriptor takes its timeout from there.
                sock.setblocking(False)
                return _Plain(sock)
            stream = trio.SSLStream(tcp, self._tls, server_hostname=self._host)
            try:
                await stream.do_handshake()
            except BaseException:
                tcp.socket.close()
                raise
            return _Tls(stream)
        raise _Late

    def _keep(self, connection: _Connection) -> None:
        if len(self._idle) < _IDLE:
            self._idle.append(connection)
        else:
            connection.close()  # over the cap (probes overlapped): let it go at once


async def _read_response(
    stream: _Receiver, keep: bytearray | None = None, max_body: int = MAX_BODY
) -> tuple[int, bool]:
    """The status of the answer on `stream`, once its body is read (into `keep`, when
    given, up to `max_body` bytes); and whether the connection may be used again."""
    buffer = bytearray()
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEADER:
            raise ProbeError(f"headers longer than {MAX_HEADER} bytes")
        chunk = await stream.receive_some(_READ)
        if not chunk and not buffer:
            raise Unanswered("connection closed before an answer")
        if not chunk:
            raise ProbeError("connection closed before the headers ended")
        buffer += chunk
    if end > MAX_HEADER:
        raise ProbeError(f"headers longer than {MAX_HEADER} bytes")
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    rest = buffer[end + 4 :]
    parts = head[0].split(" ", 2)
    code = parts[1] if len(parts) >= 2 else ""
    # isascii too: str.isdigit takes latin-1's '²' for a digit, and int() does not.
    if not parts[0].startswith("HTTP/1.") or not (code.isascii() and code.isdigit()):
        raise ProbeError(f"not an HTTP/1.x status line: {head[0][:80]!r}")
    status = int(code)
    headers: dict[str, str] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        # Repeated headers are one comma list (RFC 9110, 5.3), as h11 reads them.
        headers[key] = f"{headers[key]}, {value.strip().lower()}" if key in headers else (
            value.strip().lower()
        )  # fmt: skip
    # "close" among Connection's tokens ends the connection ("keep-alive, close" too).
    tokens = {token.strip() for token in headers.get("connection", "").split(",")}
    keep_alive = parts[0] == "HTTP/1.1" and "close" not in tokens
    if status in (204, 304) or 100 <= status < 200:
        return status, keep_alive
    if "chunked" in headers.get("transfer-encoding", ""):
        await _discard_chunked(stream, rest, keep, max_body)
    elif (length := headers.get("content-length")) is not None:
        if not (length.isascii() and length.isdigit()):
            raise ProbeError(f"bad Content-Length {length!r}")
        await _discard(stream, rest, int(length), keep, max_body)
    else:
        await _discard_to_eof(stream, rest, keep, max_body)
        keep_alive = False
    return status, keep_alive


async def _discard(
    stream: _Receiver,
    have: bytearray,
    length: int,
    keep: bytearray | None = None,
    max_body: int = MAX_BODY,
) -> None:
    if length > max_body:
        raise ProbeError(f"a body of {length} bytes, more than {max_body}")
    if keep is not None:
        keep += have[:length]
    left = length - len(have)
    while left > 0:
        chunk = await stream.receive_some(min(left, _READ))
        if not chunk:
            raise ProbeError("connection closed in the body")
        left -= len(chunk)
        if keep is not None:
            keep += chunk


async def _discard_to_eof(
    stream: _Receiver,
    have: bytearray,
    keep: bytearray | None = None,
    max_body: int = MAX_BODY,
) -> None:
    total = len(have)
    if keep is not None:
        keep += have
    while chunk := await stream.receive_some(_READ):
        total += len(chunk)
        if total > max_body:
            raise ProbeError(f"a body of more than {max_body} bytes")
        if keep is not None:
            keep += chunk


async def _discard_chunked(
    stream: _Receiver,
    have: bytearray,
    keep: bytearray | None = None,
    max_body: int = MAX_BODY,
) -> None:
    """Read a chunked body to its end (trailers included), keeping at most a chunk's worth
    (or, into `keep`, the whole body)."""
    buffer = bytearray(have)
    total = 0

    async def more() -> None:
        chunk = await stream.receive_some(_READ)
        if not chunk:
            raise ProbeError("connection closed in a chunked body")
        buffer.extend(chunk)

    while True:
        while (eol := buffer.find(b"\r\n")) < 0:
            if len(buffer) > MAX_HEADER:
                raise ProbeError("a chunk size line that never ends")
            await more()
        size_text = bytes(buffer[:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ProbeError(f"bad chunk size {size_text[:20]!r}") from None
        del buffer[: eol + 2]
        if size == 0:
            while True:  # trailer lines, if any, then the empty line that ends the body
                end = buffer.find(b"\r\n")
                if end == 0:
                    return
                if end > 0:
                    del buffer[: end + 2]
                elif len(buffer) > MAX_HEADER:
                    raise ProbeError("trailers longer than the header limit")
                else:
                    await more()
        total += size
        if total > max_body:
            raise ProbeError(f"a body of more than {max_body} bytes")
        while len(buffer) < size + 2:
            await more()
        if keep is not None:
            keep += buffer[:size]
        del buffer[: size + 2]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
