"""A group across nodes fails as one, in seconds: one supervisor per simulated node
(tests/netns.py), each a member of the group (--group-peer), with fake ranks. A rank's death
on one member takes every member out of service at once and makes each exit non-zero,
naming the member, its node and the rank; a member whose supervisor dies, or whose link is
cut, fails the group at the peer timeout; /ready waits for every member; a planned stop of
one member stops the group as planned; a member that never appears fails the group at the
startup timeout; words from another group or generation are ignored."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from trio_dpsup import MemberState
from trio_dpsup.testing import (
    CliSupervisor,
    free_port_range,
    open_cli_supervisor,
    read_pid_file,
)

from .conftest import cli_args
from .netns import Network, Node, open_network
from .relay import Impairment, open_relay

CONTROL_PORT = 9100
BASE_PORT = 8100
#: Short, so that a lost member shows within seconds (the default is 5).
PEER_TIMEOUT = 2.0
#: Past the timeouts, what a loaded machine (two suites at once on 2 cores) adds to a
#: member's exit: the stop of its ranks and its own exit (measured: up to 1.1 s more than
#: on a quiet machine). The issue's targets themselves are measured quiet (docs/across-nodes.md).
LOADED = 2.0
#: With a rank's death, long: an exit before it is the failure passed on at once, not a
#: member noticed silent.
LONG_PEER_TIMEOUT = 15.0
PROBE = str(Path(__file__).parent / "group_probe.py")


def control(node: Node) -> str:
    return f"http://{node.address}:{CONTROL_PORT}"


def member_args(
    node: Node,
    member: int,
    peers: Sequence[str],
    size: int,
    *,
    options: Sequence[str] = (),
    rank_args: Sequence[str] = (),
    peer_timeout: float = PEER_TIMEOUT,
) -> list[str]:
    """One member with one fake rank (global rank = its index), its control plane on its
    node's address."""
    return cli_args(
        1,
        BASE_PORT,
        options=[
            "--control-host", node.address, "--control-port", str(CONTROL_PORT),
            "--start-rank", str(member),
            "--group", "--group-member", str(member), "--group-size", str(size),
            *(f"--group-peer={url}" for url in peers),
            "--peer-timeout", str(peer_timeout),
            *options,
        ],
        rank_args=rank_args,
    )  # fmt: skip


def topology(net: Network, shape: str) -> list[tuple[Node, list[str]]]:
    """Each node with the peers it asks: "pair", two members asking each other; "star",
    three, the workers asking the leader (member 0) as under LeaderWorkerSet; "mesh",
    three, each asking the two others."""
    if shape in ("pair", "mesh"):
        return [(n, [control(o) for o in net.nodes if o is not n]) for n in net.nodes]
    leader, *workers = net.nodes
    return [(leader, []), *((w, [control(leader)]) for w in workers)]


@asynccontextmanager
async def open_members(
    net: Network,
    shape: str,
    tmp_path: Path,
    *,
    options: Sequence[str] = (),
    peer_timeout: float = PEER_TIMEOUT,
) -> AsyncIterator[list[CliSupervisor]]:
    """Every member of `shape` started, its rank's pids in tmp_path/member-I.pids."""
    plan = topology(net, shape)
    async with AsyncExitStack() as stack:
        members = []
        for index, (node, peers) in enumerate(plan):
            pids = ["--pid-file", str(tmp_path / f"member-{index}.pids")]
            args = member_args(
                node, index, peers, len(plan), options=options, rank_args=pids,
                peer_timeout=peer_timeout,
            )  # fmt: skip
            members.append(
                await stack.enter_async_context(open_cli_supervisor(args, prefix=node.prefix))
            )
        yield members


async def wait_group_ready(members: Sequence[CliSupervisor]) -> None:
    for member in members:
        await member.wait_for_line(r"the group is ready: all \d+ members")


async def exit_times(members: Sequence[CliSupervisor]) -> list[tuple[int, float]]:
    """Each member's exit status and when it exited (trio.current_time())."""
    results: list[tuple[int, float]] = [(0, 0.0)] * len(members)

    async def one(index: int) -> None:
        status = await members[index].wait()
        results[index] = (status, trio.current_time())

    async with trio.open_nursery() as nursery:
        for index in range(len(members)):
            nursery.start_soon(one, index)
    return results


@asynccontextmanager
async def open_probe(node: Node, urls: Sequence[str]) -> AsyncIterator[trio.Process]:
    """group_probe.py polling `urls` from `node`, once it has seen each ready."""
    argv = [sys.executable, "-u", PROBE, "--max-seconds", "30", *urls]
    async with node.open_process(argv, stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        first = b""
        with trio.fail_after(20):
            while not first.endswith(b"\n") and len(first) < 4096:
                first += await process.stdout.receive_some()
        assert first == b"polling\n", first  # nothing is out before the fault
        yield process


async def out_times(process: trio.Process) -> dict[str, float]:
    """When each URL the probe polls first answered not ready (CLOCK_MONOTONIC)."""
    assert process.stdout is not None
    data = b""
    with trio.fail_after(30):
        async for chunk in process.stdout:
            data += chunk
    return {doc["url"]: doc["out"] for doc in map(json.loads, data.decode().splitlines())}


@pytest.mark.parametrize("shape", ["pair", "star", "mesh"])
async def test_a_rank_killed_on_one_member_takes_every_member_out_within_a_second(
    tmp_path: Path, shape: str
) -> None:
    async with (
        open_network(2 if shape == "pair" else 3) as net,
        open_members(net, shape, tmp_path, peer_timeout=LONG_PEER_TIMEOUT) as members,
    ):
        with trio.fail_after(90):
            await wait_group_ready(members)
        urls = [control(node) for node in net.nodes]
        async with open_probe(net.nodes[0], urls) as probe:
            rank = read_pid_file(tmp_path / "member-1.pids")["rank"]
            killed_mono, killed = time.monotonic(), trio.current_time()
            os.kill(rank, signal.SIGKILL)
            with trio.fail_after(30):
                exits = await exit_times(members)
            out = await out_times(probe)
    for url in urls:
        assert url in out, f"{url} never answered not ready"
        assert out[url] - killed_mono <= 1.0, f"{url} out {out[url] - killed_mono:.2f}s after"
    for index, (status, when) in enumerate(exits):
        assert status != 0, f"member {index} exited 0 after the group failed"
        # The 2 s target, and what a loaded machine adds; far below the peer timeout.
        assert when - killed <= 2.0 + LOADED, f"member {index} exited {when - killed:.2f}s after"
    assert exits[1][0] == 128 + signal.SIGKILL  # the member whose rank died: that rank's
    b = net.nodes[1].address
    for index, member in enumerate(members):
        if index != 1:
            assert f"group failed: member 1 ({b}) rank 1 exited unexpectedly" in member.log


async def test_a_member_whose_supervisor_is_killed_fails_the_group_at_the_peer_timeout(
    tmp_path: Path,
) -> None:
    async with open_network(3) as net, open_members(net, "star", tmp_path) as members:
        with trio.fail_after(90):
            await wait_group_ready(members)
        killed = trio.current_time()
        members[1].send_signal(signal.SIGKILL)
        with trio.fail_after(30):
            exits = await exit_times(members)
    for index in (0, 2):
        status, when = exits[index]
        assert status == 1
        assert when - killed <= PEER_TIMEOUT + 1.0 + LOADED, f"member {index}: {when - killed:.2f}s"
    # The leader lost it; the other worker heard it from the leader.
    assert "group failed: member 1 (10.231.0.2) stopped answering" in members[0].log
    assert "group failed: member 1 (10.231.0.2) stopped answering" in members[2].log


async def test_a_cut_link_fails_both_members_at_the_peer_timeout(tmp_path: Path) -> None:
    async with open_network(2) as net, open_members(net, "pair", tmp_path) as members:
        with trio.fail_after(90):
            await wait_group_ready(members)
        a, b = net.nodes
        await net.link_down(a, b)
        cut = trio.current_time()
        with trio.fail_after(30):
            exits = await exit_times(members)
    for index, (status, when) in enumerate(exits):
        assert status == 1
        assert when - cut <= PEER_TIMEOUT + 1.0 + LOADED, f"member {index}: {when - cut:.2f}s"
    assert f"member 1 ({b.address}) stopped answering" in members[0].log
    assert f"member 0 ({a.address}) stopped answering" in members[1].log


async def ready_status(node: Node, url: str) -> tuple[str, str]:
    result = await node.run(["curl", "-s", "-m", "3", "-w", "\n%{http_code}", f"{url}/ready"])
    body, _, code = result.stdout.decode().rpartition("\n")
    return code, body.rstrip("\n")


async def test_ready_waits_for_every_member_and_a_member_not_heard_from_has_not_appeared(
    tmp_path: Path,
) -> None:
    unready = tmp_path / "b-unready"
    unready.touch()
    async with open_network(2) as net:
        a, b = net.nodes
        args_a = member_args(a, 0, [control(b)], 2)
        args_b = member_args(
            b, 1, [control(a)], 2, rank_args=["--unhealthy-if-exists", str(unready)]
        )
        async with open_cli_supervisor(args_a, prefix=a.prefix) as member_a:
            with trio.fail_after(60):
                await member_a.wait_for_line(r"all 1 ranks are ready")
            code, body = await ready_status(a, control(a))
            assert (code, body) == ("503", "waiting for the group: member 1 not yet appeared")
            async with open_cli_supervisor(args_b, prefix=b.prefix) as member_b:
                with trio.fail_after(60):
                    await member_a.wait_for_line(r"group member 1 \(10.231.0.2\) appeared")
                    await member_b.wait_for_line(r"rank 1 command")
                code, body = await ready_status(a, control(a))
                assert code == "503"
                assert body == "waiting for the group: member 1 (10.231.0.2) starting"
                unready.unlink()
                with trio.fail_after(60):
                    await member_a.wait_for_line(r"the group is ready")
                assert (await ready_status(a, control(a)))[0] == "200"
                assert (await ready_status(a, control(b)))[0] == "200"
                # A planned stop of one member is the group's: both drain and exit 0.
                member_b.send_signal(signal.SIGTERM)
                with trio.fail_after(30):
                    assert await member_b.wait() == 0
                    assert await member_a.wait() == 0
            assert "group member 1 (10.231.0.2) is stopping as planned" in member_a.log


async def test_a_member_that_never_appears_fails_the_group_at_the_startup_timeout() -> None:
    # No namespace needed: the one member asks a port where nothing listens.
    args = cli_args(
        1,
        free_port_range(1),
        options=[
            "--group", "--group-member", "0", "--group-peer", "http://127.0.0.1:9",
            "--startup-timeout", "3",
        ],
    )  # fmt: skip
    async with open_cli_supervisor(args) as member:
        began = trio.current_time()
        with trio.fail_after(30):
            assert await member.wait() == 1
        took = trio.current_time() - began
    assert "group failed: member 1 never appeared within --startup-timeout 3s" in member.log
    assert 3.0 <= took <= 3.0 + 5.0, took


async def test_words_of_another_group_or_generation_are_ignored_and_a_failure_stops() -> None:
    # The hub of a star of two (no peers of its own): its watch is answered over HTTP here.
    options = ["--group", "--group-size", "2", "--group-id", "g1"]
    args = cli_args(1, free_port_range(1), options=options)
    async with open_cli_supervisor(args) as member, httpx.AsyncClient(trust_env=False) as http:
        with trio.fail_after(30):
            url = await member.control_url()
            await member.wait_for_line(r"all 1 ranks are ready")
        word = {"group": "g1", "member": "1", "node": "10.0.0.2", "state": "failed",
                "cause_member": "1", "cause_node": "10.0.0.2",
                "cause_reason": "rank 3 exited unexpectedly: killed by SIGKILL"}  # fmt: skip
        status = (await http.get(f"{url}/status")).json()
        generation = status["members"]["generation"]
        assert [m["state"] for m in status["members"]["members"]] == ["ready", "not yet appeared"]
        typed = await member.status()  # the harness's typed form of the same document
        assert typed.members is not None
        assert [m.state for m in typed.members.members] == [
            MemberState.READY,
            MemberState.NOT_APPEARED,
        ]
        assert not typed.ready  # its ranks are, the group is not
        metrics = (await http.get(f"{url}/metrics")).text
        assert 'trio_dpsup_group_member_state{member="1",state="not yet appeared"} 1.0' in metrics
        for other in ({"group": "g2"}, {"generation": "an-older-one"}):
            answer = await http.get(f"{url}/group", params={**word, **other})
            assert answer.status_code == 409, answer.text
        assert (await http.get(f"{url}/status")).json()["failure"] is None
        for malformed in ({"member": "x"}, {"node": "10.0.0.2\nERROR forged"}, {"wait": "nan"}):
            answer = await http.get(f"{url}/group", params={**word, **malformed})
            assert answer.status_code == 400, malformed
        answer = await http.get(f"{url}/group", params={**word, "generation": generation})
        assert answer.status_code == 200
        assert answer.json()["state"] == "failed"
        with trio.fail_after(30):
            assert await member.wait() == 1
    assert "group failed: member 1 (10.0.0.2) rank 3 exited unexpectedly" in member.log


#: The soak under a slow, lossy network: the issue's numbers.
SOAK_SECONDS = 120.0
SOAK = Impairment(delay=0.3, loss=0.05)
RELAY_PORT = 9200


@pytest.mark.long
async def test_no_false_failure_under_300ms_delay_and_5_percent_loss(tmp_path: Path) -> None:
    # Longer than pytest's faulthandler_timeout by design: its dump would be noise. This
    # test's own bound is the fail_after below.
    faulthandler.cancel_dump_traceback_later()
    async with open_network(2) as net:
        a, b = net.nodes
        # Each member asks the other through a relay in its own node: both ways impaired.
        peers = [f"http://127.0.0.1:{RELAY_PORT}"]
        soak = ["--peer-timeout", "5"]  # the default, as shipped
        args_a = member_args(a, 0, peers, 2, options=soak)
        args_b = member_args(b, 1, peers, 2, options=soak)
        with trio.fail_after(SOAK_SECONDS + 120):
            async with (
                open_relay(("127.0.0.1", RELAY_PORT), (b.address, CONTROL_PORT), SOAK,
                           prefix=a.prefix),
                open_relay(("127.0.0.1", RELAY_PORT), (a.address, CONTROL_PORT), SOAK,
                           prefix=b.prefix),
                open_cli_supervisor(args_a, prefix=a.prefix) as member_a,
                open_cli_supervisor(args_b, prefix=b.prefix) as member_b,
            ):  # fmt: skip
                await wait_group_ready([member_a, member_b])
                with trio.move_on_after(SOAK_SECONDS):
                    # Returns early only if a member exits: a false failure.
                    await exit_times([member_a, member_b])
                assert member_a.process.returncode is None, member_a.log
                assert member_b.process.returncode is None, member_b.log
                assert (await ready_status(a, control(a)))[0] == "200"
                assert (await ready_status(b, control(b)))[0] == "200"
                for member in (member_a, member_b):
                    member.send_signal(signal.SIGTERM)
                assert [status for status, _ in await exit_times([member_a, member_b])] == [0, 0]
    for member in (member_a, member_b):
        assert "group failed" not in member.log


async def test_a_member_of_the_previous_generation_is_ignored_by_the_recreated_group(
    tmp_path: Path,
) -> None:
    # The leader is recreated at its address (as LeaderWorkerSet recreates a group) while
    # the old worker still runs: the new leader ignores the old worker's words, the old
    # worker ignores the new leader's, and a new worker joins the new leader.
    async with open_network(3) as net:
        leader_node, old_node, new_node = net.nodes
        to_leader = [control(leader_node)]
        leader_args = member_args(leader_node, 0, [], 2)
        async with (
            open_cli_supervisor(leader_args, prefix=leader_node.prefix) as old_leader,
            open_cli_supervisor(
                member_args(old_node, 1, to_leader, 2), prefix=old_node.prefix
            ) as old_worker,
        ):
            with trio.fail_after(60):
                await wait_group_ready([old_leader, old_worker])
            old_leader.send_signal(signal.SIGKILL)
            with trio.fail_after(10):
                await old_leader.wait()
            async with open_cli_supervisor(leader_args, prefix=leader_node.prefix) as leader:
                with trio.fail_after(60):
                    await leader.wait_for_line(r"all 1 ranks are ready")
                    # The old worker stops hearing its own leader, and fails.
                    assert await old_worker.wait() == 1
                assert "member 0 (10.231.0.1) stopped answering" in old_worker.log
                assert "is of group group, generation" in leader.log  # ignored, once
                code, body = await ready_status(leader_node, control(leader_node))
                assert (code, body) == ("503", "waiting for the group: member 1 not yet appeared")
                new_args = member_args(new_node, 1, to_leader, 2)
                async with open_cli_supervisor(new_args, prefix=new_node.prefix) as new_worker:
                    with trio.fail_after(60):
                        await wait_group_ready([leader, new_worker])
                    assert leader.process.returncode is None
                    assert "group failed" not in leader.log
                    for member in (leader, new_worker):
                        member.send_signal(signal.SIGTERM)
                    with trio.fail_after(30):
                        assert [s for s, _ in await exit_times([leader, new_worker])] == [0, 0]


async def test_a_planned_stop_of_the_leader_stops_the_star_as_planned(tmp_path: Path) -> None:
    async with open_network(3) as net, open_members(net, "star", tmp_path) as members:
        with trio.fail_after(60):
            await wait_group_ready(members)
        members[0].send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert [status for status, _ in await exit_times(members)] == [0, 0, 0]
    for member in members[1:]:
        assert "group member 0 (10.231.0.1) is stopping as planned" in member.log
        assert "draining ranks" in member.log
        assert "group failed" not in member.log
