"""Simulated nodes (tests/netns.py): namespaces joined by veth pairs reach each other over
HTTP and only over their links; a link cut fails a connect at once and mending it brings
it back; a relay started in one node delays the way to another; nothing is left after a
network, even one whose test failed. Skipped, in one line, where namespaces are refused."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from trio_dpsup.testing import open_cli_supervisor

from .conftest import cli_args
from .netns import LOCK_DIR, PREFIX, Node, open_network
from .relay import Impairment, open_relay

PORT = 8000  # the same in every node: each has its own ports


@asynccontextmanager
async def http_server(node: Node) -> AsyncIterator[None]:
    """``python -m http.server`` on `node`'s address, once it listens."""
    argv = [sys.executable, "-u", "-m", "http.server", "--bind", node.address, str(PORT)]
    async with node.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    ) as process:
        assert process.stdout is not None
        with trio.fail_after(20):
            line = await process.stdout.receive_some()
        assert b"Serving HTTP on" in line, line
        yield


async def get(node: Node, url: str, timeout: float = 5.0) -> tuple[str, float]:  # noqa: ASYNC109
    """curl `url` from `node`: its HTTP status ("000": no answer) and how long it took."""
    began = trio.current_time()
    result = await node.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             "-m", str(timeout), url])  # fmt: skip
    return result.stdout.decode(), trio.current_time() - began


async def ip_output(*args: str) -> str:
    result = await trio.run_process(["ip", *args], capture_stdout=True)
    return result.stdout.decode()


async def test_two_nodes_reach_each_other_over_their_link_only() -> None:
    async with open_network(2) as net:
        a, b = net.nodes
        assert (a.address, b.address) == ("10.231.0.1", "10.231.0.2")
        async with http_server(b):
            assert (await get(a, f"http://{b.address}:{PORT}/"))[0] == "200"
            # b's address is on b's link and nowhere else: not this machine's.
            assert b.address not in await ip_output("-o", "addr")
            assert b.address in await ip_output("-n", b.name, "-o", "addr")


async def test_a_cut_link_fails_a_connect_at_once_and_mending_it_brings_it_back() -> None:
    async with open_network(3) as net:
        a, b, c = net.nodes
        async with http_server(a), http_server(b), http_server(c):
            to_b, to_c = f"http://{b.address}:{PORT}/", f"http://{c.address}:{PORT}/"
            to_a = f"http://{a.address}:{PORT}/"
            assert (await get(a, to_b))[0] == (await get(b, to_a))[0] == "200"
            await net.link_down(a, b)
            status, took = await get(a, to_b, timeout=3)
            assert status == "000"
            assert took < 1.0, f"the connect failed after {took:.2f}s, not at once"
            assert (await get(b, to_a, timeout=3))[0] == "000"
            assert (await get(a, to_c))[0] == "200"  # the other links stand
            await net.link_up(a, b)
            assert (await get(a, to_b))[0] == (await get(b, to_a))[0] == "200"


async def test_a_relay_in_one_node_delays_the_way_to_another() -> None:
    delay = 0.3
    async with open_network(2) as net:
        a, b = net.nodes
        async with (
            http_server(b),
            open_relay(("127.0.0.1", 9000), (b.address, PORT), Impairment(delay), prefix=a.prefix),
        ):
            status, direct = await get(a, f"http://{b.address}:{PORT}/")
            assert status == "200"
            status, relayed = await get(a, "http://127.0.0.1:9000/")
            assert status == "200"
    # A new connection: the handshake's round trip, then the request's and the answer's.
    assert 4 * delay <= relayed < 4 * delay + direct + 0.5, (relayed, direct)


async def test_nothing_is_left_after_a_network_even_one_whose_test_failed() -> None:
    names: list[str] = []
    strays: list[trio.Process] = []

    async def failing_test() -> None:
        async with open_network(2) as net:
            names.extend(n.name for n in net.nodes)
            # Not the test's to stop: the network's cleanup must kill it.
            command = net.nodes[0].command(["sleep", "600"])
            strays.append(await trio.lowlevel.open_process(command))
            assert set(names) <= set((await ip_output("netns", "list")).split())
            raise RuntimeError("the test failed")

    with pytest.raises(RuntimeError, match="the test failed"):
        await failing_test()
    (stray,) = strays
    tag = names[0].rsplit("-", 1)[0]
    with trio.fail_after(5):
        assert await stray.wait() == -9
    listed = await ip_output("netns", "list")
    assert not any(name in listed for name in names), listed
    assert not (LOCK_DIR / f"{tag}.lock").exists()


async def test_a_network_left_by_a_killed_run_is_swept_by_the_next() -> None:
    leftover = f"{PREFIX}999999999-0-0"  # no owner holds its lock: its run was killed
    added = await trio.run_process(["ip", "netns", "add", leftover], check=False)
    if added.returncode != 0:
        pytest.skip("network namespaces refused here")
    try:
        async with open_network(1):
            assert leftover not in (await ip_output("netns", "list")).split()
    finally:
        await trio.run_process(["ip", "netns", "del", leftover], check=False,
                               capture_stderr=True)  # fmt: skip


async def test_where_namespaces_cannot_be_made_the_test_is_skipped_in_one_line() -> None:
    with pytest.raises(pytest.skip.Exception) as skipped:
        async with open_network(2, ip="/nonexistent/ip"):
            raise AssertionError("no network without ip")
    message = str(skipped.value)
    assert "/nonexistent/ip" in message
    assert "\n" not in message


async def test_a_supervisor_in_one_node_serves_another_over_the_link() -> None:
    # The shape of the group tests: a supervisor per node (its ranks on that node's own
    # loopback), its control plane on the node's address, reached from the other node.
    async with open_network(2) as net:
        a, b = net.nodes
        args = cli_args(1, 8100, options=["--control-host", b.address, "--control-port", "9100"])
        async with open_cli_supervisor(args, prefix=b.prefix) as supervisor:
            with trio.fail_after(30):
                await supervisor.wait_ready()
            assert (await get(a, f"http://{b.address}:9100/ready"))[0] == "200"
            await net.link_down(a, b)
            assert (await get(a, f"http://{b.address}:9100/ready", timeout=2))[0] == "000"
            supervisor.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                assert await supervisor.wait() == 0
