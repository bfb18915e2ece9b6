"""The probe client parses HTTP/1.1 by hand, for CPU (see _ranks/http_probe.py). It is held to h11:
every response h11 writes, chunked or not, with odd but legal headers, cut at any read
boundary, must give the same status and the same keep-alive verdict as h11's own client, and
leave nothing of the response unread. A unit test of a private function, on purpose: the
parser has no public face, and h11 is the reference it is kept only against."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import partial

import h11
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_dpsup._ranks.http_probe import HttpProbe, ProbeError, _read_response  # held to h11

REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: trio-dpsup\r\n\r\n"

#: Header names a server may send that mean nothing to a probe (any case), and values.
_TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1,
                 max_size=12)  # fmt: skip
_VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20).map(
    lambda v: v.strip()
)
_CONNECTION = st.sampled_from(
    [
        None,
        "close",
        "Close",
        "keep-alive",
        "Keep-Alive",
        "keep-alive, close",
        "close, foo",
        "upgrade",
    ]
)


class Pieces(trio.abc.ReceiveStream):
    """A stream that hands out `pieces` one receive at a time, then EOF."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self._pieces = list(pieces)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self._pieces.pop(0) if self._pieces else b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    @property
    def left(self) -> int:
        return sum(map(len, self._pieces))


def h11_response(
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    chunks: list[int],
    chunked: bool,
    connection: str | None,
) -> bytes:
    """What h11's server writes for this response to REQUEST."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(REQUEST)
    assert isinstance(server.next_event(), h11.Request)
    assert isinstance(server.next_event(), h11.EndOfMessage)
    framing = (
        [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(len(body)))]
    )
    extra = [] if connection is None else [("Connection", connection)]
    out = server.send(h11.Response(status_code=status, headers=[*headers, *framing, *extra]))
    assert out is not None
    bodyless = status in (204, 304)
    if not bodyless:
        start = 0
        for size in [*chunks, len(body)]:
            piece = body[start : start + size]
            start += len(piece)
            if piece:
                out += server.send(h11.Data(data=piece)) or b""
    out += server.send(h11.EndOfMessage()) or b""
    return out


def h11_reads(data: bytes) -> tuple[int, bool]:
    """The status and the keep-alive verdict of h11's own client reading `data`."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/health", headers=[("Host", "127.0.0.1:8000")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    status = None
    while True:
        event = client.next_event()
        if isinstance(event, h11.Response):
            status = event.status_code
        if isinstance(event, h11.EndOfMessage):
            break
        assert event is not h11.NEED_DATA, "h11 wants more than its server wrote"
    assert status is not None
    return status, client.their_state is h11.DONE and client.our_state is h11.DONE


def _without_framing(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    framing = ("content-length", "transfer-encoding", "connection")
    return [(name, value) for name, value in headers if name.lower() not in framing]


@settings(max_examples=300, deadline=None)
@given(
    status=st.sampled_from([200, 201, 204, 299, 304, 400, 404, 500, 503, 599]),
    headers=st.lists(st.tuples(_TOKEN, _VALUE), max_size=6).map(_without_framing),
    body=st.binary(max_size=3000),
    chunks=st.lists(st.integers(1, 700), max_size=6),
    chunked=st.booleans(),
    connection=_CONNECTION,
    cuts=st.lists(st.integers(1, 5000), max_size=12),
)
def test_the_probe_parser_agrees_with_h11(
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    chunks: list[int],
    chunked: bool,
    connection: str | None,
    cuts: list[int],
) -> None:
    data = h11_response(status, headers, body, chunks, chunked, connection)
    expected = h11_reads(data)
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(points) if b > a]
    stream = Pieces(pieces)
    got = trio.run(_read_response, stream)
    assert got == expected, (data[:300], got, expected)
    assert stream.left == 0, "the probe left part of the response unread"
    # Kept (a metrics read, a canary): the body as sent, whatever its framing and cuts.
    kept = bytearray()
    assert trio.run(_read_response, Pieces(pieces), kept) == expected
    assert bytes(kept) == (b"" if status in (204, 304) else body)


@settings(max_examples=50, deadline=None)
@given(
    status=st.sampled_from([200, 503]),
    body=st.binary(max_size=300),
    chunks=st.lists(st.integers(1, 50), max_size=4),
    chunked=st.booleans(),
    connection=_CONNECTION,
)
def test_the_probe_parser_reads_a_byte_at_a_time(
    status: int, body: bytes, chunks: list[int], chunked: bool, connection: str | None
) -> None:
    # Every byte its own read: every read boundary there is.
    data = h11_response(status, [("Server", "x")], body, chunks, chunked, connection)
    stream = Pieces([data[i : i + 1] for i in range(len(data))])
    assert trio.run(_read_response, stream) == h11_reads(data)
    assert stream.left == 0


async def test_a_kept_connection_the_server_closed_is_replaced_once() -> None:
    # A server that answers once per connection and then closes it, as llama-server does
    # with a connection idle for 5 s: the next request on the kept one gets nothing back.
    answered = []

    async def serve(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        answered.append(data.split(b"\r\n", 1)[0])
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await stream.aclose()  # after the answer, without Connection: close

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        probe = HttpProbe("127.0.0.1", port, "/health")
        for _ in range(3):  # each after the first finds its kept connection closed
            result, body = await probe.fetch(5.0, 1024)
            assert result.ok, result.error
            assert (result.status_code, body) == (200, b"ok")
        assert answered == [b"GET /health HTTP/1.1"] * 3
        await probe.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "answer",
    [
        "HTTP/1.1 2\u00b2 OK\r\nContent-Length: 0\r\n\r\n",  # latin-1's '²', a "digit"
        "HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\n",
    ],
)
def test_a_digit_that_int_cannot_read_is_a_failed_probe(answer: str) -> None:
    # str.isdigit takes '²' for a digit and int() does not: a ValueError there escaped the
    # probe instead of failing it.
    with pytest.raises(ProbeError):
        trio.run(_read_response, Pieces([answer.encode("latin-1")]))
