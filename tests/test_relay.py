"""The delaying, dropping TCP relay (tests/relay.py), in this process on loopback: the
delay it adds is measured, each way and at the handshake; a lost chunk comes one RTO
late; resets happen to the share of connections asked for; the end of a stream gets
through."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from .relay import Impairment, serve_relay

#: How late an answer may come past the delay the relay adds: a loaded two-core machine.
SLACK = 0.25


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        async for data in stream:
            await stream.send_all(data)


@asynccontextmanager
async def relayed(impairment: Impairment) -> AsyncIterator[int]:
    """An echo server behind a relay with `impairment`: the relay's port."""
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        target = ("127.0.0.1", listener.socket.getsockname()[1])
        yield await nursery.start(serve_relay, ("127.0.0.1", 0), target, impairment)
        nursery.cancel_scope.cancel()


async def round_trip(stream: trio.SocketStream, data: bytes = b"ping") -> float:
    """Seconds from sending `data` to having it all back."""
    began = trio.current_time()
    await stream.send_all(data)
    received = b""
    with trio.fail_after(10):
        while len(received) < len(data):
            chunk = await stream.receive_some()
            assert chunk, "the stream ended early"
            received += chunk
    assert received == data
    return trio.current_time() - began


async def test_the_relay_delays_each_way_and_the_handshake() -> None:
    delay = 0.3
    async with relayed(Impairment(delay)) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            first = await round_trip(stream)
            then = [await round_trip(stream) for _ in range(3)]
            bulk = await round_trip(stream, bytes(range(256)) * 1024)  # 256 KiB: many chunks
            await stream.send_eof()
            with trio.fail_after(delay * 2 + SLACK):
                assert await stream.receive_some() == b""  # the echo's EOF, relayed back
    # The handshake's round trip, then the request's and its answer's way.
    assert 4 * delay <= first < 4 * delay + SLACK, first
    assert all(2 * delay <= t < 2 * delay + SLACK for t in then), then
    # Chunks in transit do not wait for each other: a latency, not a throughput cap.
    assert 2 * delay <= bulk < 2 * delay + 2 * SLACK, bulk


async def test_a_lost_chunk_comes_one_rto_late_and_a_lost_handshake_one_syn_rto() -> None:
    delay, rto, syn_rto = 0.1, 0.2, 0.5
    async with relayed(Impairment(delay, loss=1.0, rto=rto, syn_rto=syn_rto)) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            first = await round_trip(stream)
            then = await round_trip(stream)
    each_way = delay + rto
    assert 2 * delay + syn_rto + 2 * each_way <= first < 2 * delay + syn_rto + 2 * each_way + SLACK
    assert 2 * each_way <= then < 2 * each_way + SLACK, then


def test_the_default_rto_is_linuxs_for_that_round_trip() -> None:
    assert Impairment(0.3).retransmission == pytest.approx(0.8)  # srtt + the 200 ms floor
    with pytest.raises(ValueError, match="probabilities"):
        Impairment(loss=1.5)


async def test_resets_hit_the_share_of_connections_asked_for() -> None:
    outcomes: list[str] = []
    async with relayed(Impairment(reset=0.3, seed=7)) as port:
        for _ in range(30):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                try:
                    await round_trip(stream)
                    outcomes.append("echo")
                except trio.BrokenResourceError:
                    outcomes.append("reset")  # ECONNRESET
    resets = outcomes.count("reset")
    # Seeded, so the count is the same each run; the bounds say what 30% of 30 may be.
    assert 3 <= resets <= 18, outcomes
    assert outcomes.count("echo") == 30 - resets
