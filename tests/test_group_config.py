"""The members of a group across nodes are named on the command line (--group-peer...) or
by LeaderWorkerSet's environment: bad input is exit status 2, one line naming the fix,
nothing started; under LeaderWorkerSet's variables the workers find the leader."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from trio_dpsup.testing import (
    CliSupervisor,
    free_port_range,
    open_cli_supervisor,
    read_pid_file,
    run_cli,
)

from .conftest import bare_environment, cli_args, rank_command
from .netns import open_network

#: A worker's LeaderWorkerSet variables (the names: _config/group.py says where they are
#: defined), but for those a case leaves out.
LWS = {"LWS_LEADER_ADDRESS": "10.0.0.1", "LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "1"}
PEER = "http://10.0.0.2:9000"
NOT_PEM = str(Path(__file__).parent.parent / "pyproject.toml")


@pytest.mark.parametrize(
    ("options", "environ", "message"),
    [
        (
            ["--group-peer", PEER, "--group-member", "1"],
            {},
            "--group-peer, --group-member make this supervisor one member of a group across "
            "nodes, and its ranks are not a group: pass --group",
        ),
        (
            ["--group", "--group-peer", "ftp://10.0.0.2:9000", "--group-member", "1"],
            {},
            "--group-peer 'ftp://10.0.0.2:9000' is not an http or https URL",
        ),
        (
            ["--group", "--group-peer", "http://10.0.0.2", "--group-member", "1"],
            {},
            "needs a host and the member's --control-port, e.g. http://10.0.0.2:9000",
        ),
        (
            ["--group", "--group-peer", f"{PEER}/status", "--group-member", "1"],
            {},
            "give only the scheme, host and port of the member's control plane",
        ),
        (["--group", "--group-peer", PEER], {}, "--group-peer needs --group-member"),
        (
            ["--group", "--group-peer", PEER, "--group-peer", PEER, "--group-member", "1"],
            {},
            "a member is listed twice",
        ),
        (
            ["--group", "--group-peer", PEER, "--group-member", "2"],
            {},
            "--group-member 2 is not a member of a group of 2: give 0 to 1",
        ),
        (
            ["--group", "--group-peer", PEER, "--group-member", "1", "--peer-certfile", "x"],
            {},
            "--peer-certfile and --peer-keyfile go together",
        ),
        (
            ["--group", "--group-peer", PEER, "--group-member", "1", "--peer-ca-certs", NOT_PEM],
            {},
            f"cannot use --peer-ca-certs {NOT_PEM}",
        ),
        (
            ["--group"],
            {k: v for k, v in LWS.items() if k != "LWS_WORKER_INDEX"},
            "a partial LeaderWorkerSet environment: LWS_LEADER_ADDRESS, LWS_GROUP_SIZE set "
            "but LWS_WORKER_INDEX not",
        ),
        (
            ["--group", "--group-peer", PEER, "--group-member", "1", "--restart", "on-failure"],
            {},
            "--restart on-failure: --group-peer (or --group-size) makes this node one member "
            "of a group across nodes, and ranks restarted on one node cannot rejoin it: pass "
            "--restart never",
        ),
        (
            ["--group", "--restart", "on-failure"],
            LWS,
            "--restart on-failure: LeaderWorkerSet's LWS_GROUP_SIZE=2 makes this node one",
        ),
        (
            ["--group"],
            {**LWS, "LWS_GROUP_SIZE": "two"},
            "LWS_GROUP_SIZE='two' is not a whole number of at least 1",
        ),
        (
            ["--group", "--control-port", "0"],
            LWS,
            "under LeaderWorkerSet a worker watches the leader at the leader's --control-port",
        ),
    ],
)
async def test_bad_group_input_is_exit_2_naming_the_fix(
    tmp_path: Path, options: list[str], environ: dict[str, str], message: str
) -> None:
    pid_file = tmp_path / "pids"
    args = ["--ranks", "1", "--gpus-per-rank", "0", *options, "--", *rank_command(pid_file)]
    status, _, stderr = await run_cli(args, env={**bare_environment(), **environ})
    assert status == 2, stderr
    assert stderr.startswith("trio-dpsup: error: ")
    assert message in stderr, stderr
    assert "Traceback" not in stderr
    assert not pid_file.exists()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "0.0.0.0"])
async def test_a_peer_that_is_this_members_own_control_plane_is_exit_2(
    tmp_path: Path, host: str
) -> None:
    pid_file = tmp_path / "pids"
    base = free_port_range(2)  # the rank's port, then the control plane's
    control = base + 1
    peer = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{control}"
    args = [
        "--ranks", "1", "--gpus-per-rank", "0", "--base-port", str(base),
        "--control-host", host, "--control-port", str(control),
        "--group", "--group-member", "1", "--group-peer", peer,
        "--", *rank_command(pid_file),
    ]  # fmt: skip
    status, _, stderr = await run_cli(args, env=bare_environment())
    assert status == 2, stderr
    assert f"--group-peer {peer} is this member's own control plane" in stderr
    assert not pid_file.exists()


async def test_under_leaderworkerset_the_workers_find_the_leader(tmp_path: Path) -> None:
    async with open_network(2) as net:
        leader = net.nodes[0]
        members: list[CliSupervisor] = []
        async with trio.open_nursery() as nursery:
            for index, node in enumerate(net.nodes):
                environ = {
                    **os.environ,
                    "LWS_LEADER_ADDRESS": leader.address,
                    "LWS_GROUP_SIZE": "2",
                    "LWS_WORKER_INDEX": str(index),
                }
                pids = ["--pid-file", str(tmp_path / f"{index}.pids")]
                args = cli_args(
                    1,
                    8100,
                    options=["--control-host", node.address, "--control-port", "9100",
                             "--start-rank", str(index), "--group"],
                    rank_args=pids,
                )  # fmt: skip
                members.append(await nursery.start(_run_member, args, environ, node.prefix))
            with trio.fail_after(60):
                for member in members:
                    await member.wait_for_line(r"the group is ready: all 2 members")
            assert "from LeaderWorkerSet" in members[1].log
            assert f"asking http://{leader.address}:9100 every" in members[1].log
            assert "asking no one (the others ask this member)" in members[0].log
            os.kill(read_pid_file(tmp_path / "0.pids")["rank"], signal.SIGKILL)
            with trio.fail_after(10):
                assert await members[1].wait() == 1
                assert await members[0].wait() == 137
            nursery.cancel_scope.cancel()
    assert f"group failed: member 0 ({leader.address}) rank 0 exited" in members[1].log


async def _run_member(
    args: list[str],
    environ: dict[str, str],
    prefix: tuple[str, ...],
    *,
    task_status: trio.TaskStatus[CliSupervisor] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with open_cli_supervisor(args, environ, prefix=prefix) as member:
        task_status.started(member)
        await trio.sleep_forever()  # until the test is done with it (the nursery's cancel)
