"""Simulated nodes for tests: network namespaces joined by veth pairs, made by the test.

``open_network(n)`` makes `n` namespaces ("nodes") and a veth pair between every two of
them (or only the pairs given), and deletes them all on the way out, failure or not::

    async with open_network(2) as net:
        a, b = net.nodes
        async with b.open_process(["python3", "-m", "http.server", "-b", b.address, "8000"]):
            await a.run(["curl", "-sf", f"http://{b.address}:8000/"])
        await net.link_down(a, b)          # the cable cut: see `Network.link_down`
        await net.link_up(a, b)

A node has one address, ``10.231.0.{index + 1}``, on each of its links and on none of the
machine's own interfaces, with a host route to each neighbour through the link to it; its
loopback is up, so what listens on 127.0.0.1 in one node (a supervisor's ranks) is apart
from every other node's and from the machine's. Addresses need not differ between tests
run in parallel: each node's addresses live in its own namespace. Names must, as
namespaces are named machine-wide: each carries this process's pid and a serial number,
and the interfaces are made inside the namespaces (never in the machine's own), so two
runs cannot collide.

Needs root (CAP_SYS_ADMIN) and iproute2's ``ip``; where either is missing, or the kernel
refuses a namespace, `open_network` skips the test with one line saying why. A test run
that is SIGKILLed cannot clean up after itself: the next `open_network` deletes the
namespaces of networks whose owner is gone (each owner holds a lock file while it runs).

Commands run in a node through ``ip netns exec NAME``, which execs them (same pid): a
process started so is the caller's child, and a signal to it reaches it. `Node.prefix` is
that wrapper, for a caller that starts the process itself
(``open_cli_supervisor(args, prefix=node.prefix)``).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

__all__ = ["NetnsError", "Network", "Node", "open_network"]

#: The nodes' addresses: node i is SUBNET.(i + 1).
SUBNET = "10.231.0"
MAX_NODES = 16
#: Every namespace this module makes is named PREFIX + "{pid}-{serial}-{index}".
PREFIX = "dpsup-t"
#: Where each network's owner holds its lock (a leftover is one whose lock is free).
LOCK_DIR = Path("/run/dpsup-netns")
#: The bound of every ``ip`` command, and of the whole cleanup.
IP_TIMEOUT = 10.0
CLEANUP_TIMEOUT = 20.0

_serial = itertools.count()


class NetnsError(RuntimeError):
    """An ``ip`` command failed (after the namespaces were allowed: not a skip)."""


@dataclass(frozen=True)
class Node:
    """One simulated node: a network namespace with one address."""

    #: The namespace's name (``ip netns``), machine-wide.
    name: str
    index: int
    #: Its address on every link it has.
    address: str

    @property
    def prefix(self) -> tuple[str, ...]:
        """The wrapper that runs a command in this node."""
        return ("ip", "netns", "exec", self.name)

    def command(self, argv: Sequence[str]) -> list[str]:
        return [*self.prefix, *argv]

    async def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        """`trio.run_process` of `argv` in this node (output captured, not checked).

        **Cancellation**: as `trio.run_process`: the process is killed."""
        options: dict[str, Any] = {"capture_stdout": True, "capture_stderr": True}
        options.update(check=False, stdin=subprocess.DEVNULL, **kwargs)
        return await trio.run_process(self.command(argv), **options)

    @contextlib.asynccontextmanager
    async def open_process(self, argv: Sequence[str], **kwargs: Any) -> AsyncIterator[trio.Process]:
        """`argv` running in this node for the block; SIGKILLed and reaped on the way out.
        `kwargs` go to `trio.lowlevel.open_process` (stdout=subprocess.PIPE...)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        process = await trio.lowlevel.open_process(self.command(argv), **kwargs)
        try:
            yield process
        finally:
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()


@dataclass(frozen=True)
class Network:
    """The nodes of one `open_network` and the links between them."""

    nodes: tuple[Node, ...]
    #: The pairs of node indices joined by a veth pair, each (lower, higher).
    links: frozenset[tuple[int, int]]
    _ip: str = "ip"

    async def link_down(self, a: Node, b: Node) -> None:
        """Cut the link between `a` and `b`: both ends down, as both kernels see a pulled
        cable. A new connection across it fails at once on either side (no route:
        ENETUNREACH); a connection already open goes silent (no FIN, no RST: each side
        learns of it only by its own timeout). There is no other way between two nodes:
        the machine's own interfaces carry none of their addresses.

        **Cancellation**: the link may be left half down."""
        self._check_link(a, b)
        for here, there in ((a, b), (b, a)):
            await _ip(self._ip, "-n", here.name, "link", "set", _veth(there), "down")

    async def link_up(self, a: Node, b: Node) -> None:
        """Mend the link: both ends up, and the host routes (which went with it) back."""
        self._check_link(a, b)
        for here, there in ((a, b), (b, a)):
            await _ip_batch(
                self._ip, here.name, [f"link set {_veth(there)} up", _route(here, there)]
            )

    def neighbours(self, node: Node) -> list[Node]:
        """The nodes `node` has a link to."""
        return [
            self.nodes[b if a == node.index else a] for a, b in self.links if node.index in (a, b)
        ]

    def _check_link(self, a: Node, b: Node) -> None:
        if (min(a.index, b.index), max(a.index, b.index)) not in self.links:
            raise ValueError(f"no link between nodes {a.index} and {b.index}")


@contextlib.asynccontextmanager
async def open_network(
    count: int, links: Iterable[tuple[int, int]] | None = None, *, ip: str = "ip"
) -> AsyncIterator[Network]:
    """`count` nodes joined by veth pairs: every two of them, or the pairs of indices in
    `links`. Skips the test (`pytest.skip`, one line) where namespaces are refused; `ip`
    names the binary (a test seam).

    **Cancellation**: safe; cleanup is shielded and bounded by `CLEANUP_TIMEOUT`."""
    if not 1 <= count <= MAX_NODES:
        raise ValueError(f"count must be from 1 to {MAX_NODES}, not {count}")
    pairs = frozenset(
        (min(a, b), max(a, b))
        for a, b in (itertools.combinations(range(count), 2) if links is None else links)
    )
    if any(a == b or not 0 <= a < b < count for a, b in pairs):
        raise ValueError(f"links must join two different nodes of 0..{count - 1}: {pairs}")
    _skip_unless_permitted(ip)
    tag = f"{PREFIX}{os.getpid()}-{next(_serial)}"
    nodes = tuple(Node(f"{tag}-{i}", i, f"{SUBNET}.{i + 1}") for i in range(count))
    with _owner_lock(tag):
        await _sweep_leftovers(ip)
        try:
            created = await _ip_batch_result(ip, None, [f"netns add {n.name}" for n in nodes])
            if created.returncode != 0:
                _skip_or_raise(created)
            veths = [
                f"link add {_veth(nodes[b])} netns {nodes[a].name} "
                f"type veth peer name {_veth(nodes[a])} netns {nodes[b].name}"
                for a, b in sorted(pairs)
            ]
            if veths:
                await _ip_batch(ip, None, veths)
            net = Network(nodes, pairs, ip)
            for node in nodes:
                lines = ["link set lo up"]
                for there in net.neighbours(node):
                    lines += [
                        f"addr add {node.address}/32 dev {_veth(there)}",
                        f"link set {_veth(there)} up",
                        _route(node, there),
                    ]
                await _ip_batch(ip, node.name, lines)
            yield net
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                await _delete(ip, [n.name for n in nodes])


def _veth(to: Node) -> str:
    """The name, in any node, of its end of the link to node `to` (names are per node)."""
    return f"v{to.index}"


def _route(here: Node, there: Node) -> str:
    return f"route replace {there.address}/32 dev {_veth(there)} src {here.address}"


def _skip_unless_permitted(ip: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root: this test runs as another user")
    if shutil.which(ip) is None:
        pytest.skip(f"network namespaces need iproute2's `{ip}`, not found on PATH")


def _skip_or_raise(result: subprocess.CompletedProcess[bytes]) -> None:
    error = result.stderr.decode(errors="replace").strip()
    first = error.splitlines()[0] if error else f"exit status {result.returncode}"
    if any(word in error for word in ("Operation not permitted", "Permission denied")):
        pytest.skip(f"network namespaces refused here: {first}")
    raise NetnsError(f"ip netns add failed: {first}")


async def _ip(ip: str, *args: str) -> None:
    with trio.fail_after(IP_TIMEOUT):
        result = await trio.run_process(
            [ip, *args], capture_stdout=True, capture_stderr=True, check=False
        )
    if result.returncode != 0:
        raise NetnsError(f"{ip} {' '.join(args)}: {result.stderr.decode().strip()}")


async def _ip_batch_result(
    ip: str, netns: str | None, lines: Sequence[str]
) -> subprocess.CompletedProcess[bytes]:
    """``ip [-n NETNS] -batch -`` of `lines`: one process for many commands."""
    where = [] if netns is None else ["-n", netns]
    with trio.fail_after(IP_TIMEOUT):
        return await trio.run_process(
            [ip, *where, "-batch", "-"],
            stdin="".join(f"{line}\n" for line in lines).encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def _ip_batch(ip: str, netns: str | None, lines: Sequence[str]) -> None:
    result = await _ip_batch_result(ip, netns, lines)
    if result.returncode != 0:
        raise NetnsError(f"{ip} -batch in {netns or 'the host'}: {result.stderr.decode().strip()}")


async def _delete(ip: str, names: Sequence[str]) -> None:
    """Kill what runs in each namespace (only a test's own processes run there), then
    delete the namespaces, and with them their veth ends (so the pairs)."""
    for name in names:
        listed = await _ip_batch_result(ip, None, [f"netns pids {name}"])
        for pid in listed.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    # -force: every line is tried, a namespace never made (or already gone) among them.
    with trio.fail_after(IP_TIMEOUT):
        await trio.run_process(
            [ip, "-force", "-batch", "-"],
            stdin="".join(f"netns del {n}\n" for n in names).encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


@contextlib.contextmanager
def _owner_lock(tag: str) -> Iterator[None]:
    """Hold `tag`'s lock while its network exists; remove it after."""
    LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    path = LOCK_DIR / f"{tag}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


async def _sweep_leftovers(ip: str) -> None:
    """Delete the namespaces of networks whose owner is gone."""
    stale = _stale_namespaces()
    if stale:
        await _delete(ip, stale)


def _stale_namespaces() -> list[str]:
    """This module's namespaces whose network's lock is free or missing: a run that was
    killed before it could clean up. (Local files only: no waiting.)"""
    netns_dir = Path("/run/netns")
    names = [p.name for p in netns_dir.iterdir()] if netns_dir.is_dir() else []
    stale: list[str] = []
    for tag in {name.rsplit("-", 1)[0] for name in names if name.startswith(PREFIX)}:
        path = LOCK_DIR / f"{tag}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            pass  # gone with its owner, or never made: stale either way
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner runs
            finally:
                os.close(fd)
            path.unlink(missing_ok=True)
        stale += [n for n in names if n.rsplit("-", 1)[0] == tag]
    return stale
