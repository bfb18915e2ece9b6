"""A delaying, dropping TCP relay: what a slow, lossy network does to TCP, where the kernel
has no ``netem`` qdisc (these machines' do not).

`serve_relay` listens on one address and forwards each connection to a target, adding
what the `Impairment` says; ``python tests/relay.py --listen H:P --target H:P ...`` is the
same as a process, for a relay inside a simulated node (tests/netns.py)::

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_relay, ("127.0.0.1", 0), target, Impairment(0.3))
        ...  # connect to 127.0.0.1:port: each byte arrives 0.3 s later, each way
        nursery.cancel_scope.cancel()

    async with open_relay(("127.0.0.1", 9000), (b.address, 8000), Impairment(0.3, 0.05),
                          prefix=a.prefix):           # in node a, to node b
        ...

What "delay d and loss p" means here. The relay sees a byte stream, not packets: TCP
retransmits what the network loses, so what an application sees of loss is delay, and
seldom a failure. Modelled so, per connection:

* **Delay**: each chunk read from one side is written to the other `delay` seconds after
  it arrived, in both directions, without holding back the chunks behind it (a link's
  latency, not a cap on its throughput); an end of stream (FIN) travels the same way. A
  request and its answer so take 2*delay more (one round trip).
* **Handshake**: a new connection reaches the target one round trip (2*delay) after it
  was accepted, as TCP's SYN and SYN-ACK cross the link before the first byte; so the
  first answer on a new connection takes 4*delay more.
* **Loss**: each chunk, with probability `loss`, arrives one retransmission timeout
  later (`rto`; by default Linux's, 2*delay + 0.2 s: the smoothed round trip plus its
  200 ms floor), and holds back the chunks after it (TCP delivers in order); each new
  connection's handshake, with probability `loss`, takes `syn_rto` longer (Linux's first
  SYN retransmission, 1 s).
* **Resets**: each new connection, with probability `reset`, is reset at once (RST, what a
  middlebox or a lost peer state gives): the one loss TCP cannot hide.

Bounded: chunks of at most 64 KiB, at most 256 of them in transit per direction (then
reading waits), at most `max_connections` at once (more are reset); the process form
exits after ``--max-seconds``. Cancelling `serve_relay` closes every connection.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import trio

__all__ = ["Impairment", "main", "open_relay", "serve_relay"]

CHUNK_BYTES = 64 * 1024
MAX_CHUNKS_IN_TRANSIT = 256
#: Linux: the floor of the retransmission timeout, and the first SYN retransmission.
TCP_RTO_MIN = 0.2
TCP_SYN_RTO = 1.0
#: The line the process form writes once it listens: "relay listening on HOST:PORT".
READY_LINE = "relay listening on"


@dataclass(frozen=True)
class Impairment:
    """What the relay does to each connection (see the module's docstring)."""

    #: Seconds added to each chunk, each way.
    delay: float = 0.0
    #: The probability that a chunk (or a handshake) is lost once and retransmitted.
    loss: float = 0.0
    #: Seconds a lost chunk comes late; None: 2*delay + 0.2 (Linux's RTO).
    rto: float | None = None
    #: Seconds a lost handshake comes late.
    syn_rto: float = TCP_SYN_RTO
    #: The probability that a new connection is reset at once.
    reset: float = 0.0
    #: Seeds the draws (None: a fresh seed), so a run can be repeated.
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.delay < 0 or self.syn_rto < 0 or (self.rto is not None and self.rto < 0):
            raise ValueError(f"delays must not be negative: {self}")
        if not (0 <= self.loss <= 1 and 0 <= self.reset <= 1):
            raise ValueError(f"loss and reset are probabilities, 0 to 1: {self}")

    @property
    def retransmission(self) -> float:
        return 2 * self.delay + TCP_RTO_MIN if self.rto is None else self.rto


async def serve_relay(
    listen: tuple[str, int],
    target: tuple[str, int],
    impairment: Impairment = Impairment(),
    *,
    max_connections: int = 512,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Relay connections to `listen` to `target`, impaired, until cancelled; started
    (``nursery.start``) with the port it listens on (`listen`'s port 0: one of the
    kernel's).

    **Cancellation**: every connection is closed (abruptly: what is in transit is lost)."""
    rng = random.Random(impairment.seed)
    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
    port = listeners[0].socket.getsockname()[1]
    open_connections = 0

    async def relay_one(client: trio.SocketStream) -> None:
        nonlocal open_connections
        async with client:
            # Draws in the order of acceptance, so a seed repeats which connections fail.
            reset, lost_syn = rng.random() < impairment.reset, rng.random() < impairment.loss
            if reset or open_connections >= max_connections:
                _reset(client)
                return
            open_connections += 1
            try:
                await trio.sleep(2 * impairment.delay + (impairment.syn_rto if lost_syn else 0))
                try:
                    upstream = await trio.open_tcp_stream(*target)
                except OSError:
                    _reset(client)  # as the target itself would refuse
                    return
                async with upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(_forward, client, upstream, impairment, rng)
                    nursery.start_soon(_forward, upstream, client, impairment, rng)
            finally:
                open_connections -= 1

    async with trio.open_nursery() as nursery:
        task_status.started(port)
        await trio.serve_listeners(relay_one, listeners, handler_nursery=nursery)


async def _forward(
    source: trio.SocketStream,
    sink: trio.SocketStream,
    impairment: Impairment,
    rng: random.Random,
) -> None:
    """One direction: read chunks, deliver each when it is due, in order; then the EOF.
    A broken side ends the connection (both directions)."""
    send, receive = trio.open_memory_channel[tuple[float, bytes]](MAX_CHUNKS_IN_TRANSIT)

    async def deliver() -> None:
        async with receive:
            async for due, data in receive:
                await trio.sleep_until(due)
                if not data:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await sink.send_eof()
                    return
                await sink.send_all(data)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver)
            last_due = 0.0
            async with send:
                for _ in range(sys.maxsize):  # until the end of the stream
                    data = await source.receive_some(CHUNK_BYTES)
                    due = trio.current_time() + impairment.delay
                    if data and rng.random() < impairment.loss:
                        due += impairment.retransmission
                    last_due = due = max(due, last_due)  # in order, as TCP delivers
                    await send.send((due, data))
                    if not data:
                        break
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        # One side is gone: so is the connection, as the other side will learn.
        _reset(source)
        _reset(sink)


def _reset(stream: trio.SocketStream) -> None:
    """Close `stream` with an RST (SO_LINGER 0), not a FIN."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()


@contextlib.asynccontextmanager
async def open_relay(
    listen: tuple[str, int],
    target: tuple[str, int],
    impairment: Impairment,
    *,
    prefix: Sequence[str] = (),
    max_seconds: float = 900.0,
) -> AsyncIterator[trio.Process]:
    """The relay as a process (after `prefix`: ``node.prefix`` runs it in a node) for the
    block, once it listens; killed on the way out. `listen` needs a real port (not 0):
    the caller names it where its clients will connect."""
    argv = [
        sys.executable, "-u", __file__,
        "--listen", f"{listen[0]}:{listen[1]}",
        "--target", f"{target[0]}:{target[1]}",
        "--delay", str(impairment.delay),
        "--loss", str(impairment.loss),
        "--syn-rto", str(impairment.syn_rto),
        "--reset", str(impairment.reset),
        "--max-seconds", str(max_seconds),
        *(["--rto", str(impairment.rto)] if impairment.rto is not None else []),
        *(["--seed", str(impairment.seed)] if impairment.seed is not None else []),
    ]  # fmt: skip
    process = await trio.lowlevel.open_process(
        [*prefix, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(20):
            first = await process.stdout.receive_some()
        if READY_LINE.encode() not in first:
            raise RuntimeError(f"the relay did not start: {first!r}, {await process.wait()}")
        yield process
    finally:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="relay.py", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--target", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--rto", type=float)
    parser.add_argument("--syn-rto", type=float, default=TCP_SYN_RTO)
    parser.add_argument("--reset", type=float, default=0.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    impairment = Impairment(args.delay, args.loss, args.rto, args.syn_rto, args.reset, args.seed)

    async def run() -> None:
        with trio.move_on_after(args.max_seconds):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_relay, args.listen, args.target, impairment)
                print(f"{READY_LINE} {args.listen[0]}:{port}", flush=True)

    trio.run(run)


if __name__ == "__main__":
    main()
