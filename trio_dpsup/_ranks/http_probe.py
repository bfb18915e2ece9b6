"""The health probe's HTTP client: one GET, as cheap as it can be, on Trio streams.

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

import ssl
from collections.abc import Sequence

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
        self._idle: list[trio.abc.Stream] = []

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
        status: int | None = None
        error: str | None = None
        stream: trio.abc.Stream | None = None
        keep = False
        try:
            with trio.move_on_after(timeout) as scope:
                for attempt in range(2):  # again, once, after a kept connection went stale
                    reused = attempt == 0 and bool(self._idle)
                    try:
                        stream = self._idle.pop() if reused else await self._connect()
                        await stream.send_all(self._request)
                        status, keep = await _read_response(stream, body, max_body)
                        if not 200 <= status < 300:
                            error = f"HTTP {status}"
                    except (
                        OSError,
                        trio.BrokenResourceError,
                        trio.ClosedResourceError,
                        Unanswered,
                    ) as exc:
                        if reused and stream is not None and not body:
                            _drop(stream)  # closed by the server while it idled: again
                            stream = None
                            continue
                        error = _describe(exc)
                    except (ProbeError, ssl.SSLError) as exc:
                        error = f"{type(exc).__name__}: {exc}"
                    break
        except BaseException:
            # Cancelled from outside (a confirmation no longer needed, a stop): the
            # connection is mid-answer, and no await may run now. Drop it at once.
            if stream is not None:
                _drop(stream)
            raise
        if scope.cancelled_caught:
            error = f"no answer within {timeout:g}s"
            keep = False
        if stream is not None:
            if keep:  # the whole answer was read, and the server keeps the connection
                self._keep(stream)
            else:
                _drop(stream)
        return ProbeResult(
            ok=error is None, status_code=status, error=error, latency=trio.current_time() - start
        )

    async def aclose(self) -> None:
        """Close the idle connections. **Cancellation**: safe."""
        idle, self._idle = self._idle, []
        for stream in idle:
            _drop(stream)

    async def _connect(self) -> trio.abc.Stream:
        tcp = await trio.open_tcp_stream(self._host, self._port)  # TCP_NODELAY: Trio's default
        if self._tls is None:
            return tcp
        stream = trio.SSLStream(tcp, self._tls, server_hostname=self._host)
        try:
            await stream.do_handshake()
        except BaseException:
            _drop(tcp)
            raise
        return stream

    def _keep(self, stream: trio.abc.Stream) -> None:
        if len(self._idle) < _IDLE:
            self._idle.append(stream)
        else:
            _drop(stream)  # over the cap (probes overlapped): let it go at once


async def _read_response(
    stream: trio.abc.ReceiveStream, keep: bytearray | None = None, max_body: int = MAX_BODY
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
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProbeError(f"not an HTTP/1.x status line: {head[0][:80]!r}")
    status = int(parts[1])
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
        if not length.isdigit():
            raise ProbeError(f"bad Content-Length {length!r}")
        await _discard(stream, rest, int(length), keep, max_body)
    else:
        await _discard_to_eof(stream, rest, keep, max_body)
        keep_alive = False
    return status, keep_alive


async def _discard(
    stream: trio.abc.ReceiveStream,
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
    stream: trio.abc.ReceiveStream,
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
    stream: trio.abc.ReceiveStream,
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


def _drop(stream: trio.abc.Stream) -> None:
    """Close a probe's connection at once, without waiting: a health check owes its server
    no TLS close_notify, and a cancelled probe may not await."""
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(inner, trio.SocketStream):
        inner.socket.close()
