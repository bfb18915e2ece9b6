"""The harness itself: its leftover check can fail, and the fake rank's output faults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_dpsup import RankExited, RankSpawnFailed, RankState, SupervisorState, SupervisorStatus
from trio_dpsup.testing import (
    FAKE_RANK,
    Form,
    Harness,
    LeftoverProcesses,
    NeedsFakeRank,
    free_port_range,
    open_harness,
    wait_pids_gone,
)

pytest_plugins = ["trio_dpsup.testing.plugin"]


async def test_leftover_check_names_and_kills_survivors(dpsup: Harness) -> None:
    deployment = await dpsup.start(1, form=Form.CLI, rank_args=["--grandchild", "setsid"])
    tree = deployment.process_tree()
    (guardian,) = tree.guardian
    rank, grandchild = tree.ranks[0]
    # Without its guardian, a dead supervisor leaves the setsid grandchild behind: the rank
    # dies by its parent-death signal, the grandchild has no such thing.
    os.kill(guardian, signal.SIGKILL)
    deployment.signal_supervisor(signal.SIGKILL)
    assert await deployment.wait_exit() == -signal.SIGKILL
    with pytest.raises(LeftoverProcesses, match=rf"pids \[{grandchild}\] outlived"):
        await deployment.assert_no_leftovers(grace=1.0)
    assert await wait_pids_gone([grandchild, rank], 2.0) == [], "the check must kill them"


def test_fake_rank_log_lines_and_last_words() -> None:
    port = free_port_range(1)
    args = ["--port", str(port), "--log-lines", "5", "--last-words", "bye", "--exit-after", "1"]
    result = subprocess.run(
        [*FAKE_RANK, *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 1
    prefix = f"fake rank {port}: log line"
    assert result.stdout == "".join(f"{prefix} {i} of 5\n" for i in (0, 2, 4)) + "bye"
    assert result.stderr == "".join(f"{prefix} {i} of 5\n" for i in (1, 3))


async def test_signal_rank_reaches_that_rank(dpsup: Harness) -> None:
    deployment = await dpsup.start(2, form=Form.CLI)
    await deployment.signal_rank(1, signal.SIGKILL)
    assert await deployment.wait_exit() == 128 + signal.SIGKILL
    assert str(await deployment.failure()) == "rank 1 exited unexpectedly: killed by SIGKILL"
    await deployment.assert_no_leftovers()


def test_rank_prefix_is_coloured_only_on_a_terminal() -> None:
    from trio_dpsup._output.pump import _prefix  # the prefix unit: a pty decides its colour

    leader, follower = os.openpty()
    try:
        assert _prefix(3, follower) == b"\x1b[32m[rank 3]\x1b[0m "
    finally:
        os.close(leader)
        os.close(follower)
    read_end, write_end = os.pipe()
    try:
        assert _prefix(3, write_end) == b"[rank 3] "
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_a_failure_before_every_rank_exists_is_raised_by_start(
    dpsup: Harness, tmp_path: Path
) -> None:
    # Rank 0's program exists, rank 1's does not: rank 1 cannot be started.
    rank0 = tmp_path / "rank0"
    rank0.write_text(f"#!{sys.executable}\nfrom trio_dpsup.testing.fake_rank import main\nmain()\n")
    rank0.chmod(0o755)
    command = [str(tmp_path / "rank{rank}"), "--port", "{port}"]
    with pytest.raises(RankSpawnFailed, match="rank 1 could not be started"):
        await dpsup.start(2, command=command, wait_ready=False)


@pytest.mark.parametrize("form", list(Form), ids=lambda form: form.value)
async def test_both_forms_read_the_same_typed_status(dpsup: Harness, form: Form) -> None:
    deployment = await dpsup.start(2, form=form)
    status = await deployment.status()
    assert isinstance(status, SupervisorStatus)
    assert status.state is SupervisorState.READY
    assert [r.state for r in status.ranks] == [RankState.READY, RankState.READY]
    assert [r.port for r in status.ranks] == list(deployment.ports)
    await deployment.crash_rank(0, 4)
    with trio.fail_after(10):
        stopping = await deployment.wait_for_state(SupervisorState.STOPPING)
        assert await deployment.wait_exit() == 4
    for failure in (stopping.failure, await deployment.failure()):
        assert isinstance(failure, RankExited)
        assert (failure.rank, failure.returncode, failure.exit_status) == (0, 4, 4)


async def test_faults_of_the_fake_rank_say_so_with_another_command(dpsup: Harness) -> None:
    command = [sys.executable, "-m", "trio_dpsup.demo", "--port", "{port}"]
    deployment = await dpsup.start(1, command=command)
    with pytest.raises(NeedsFakeRank, match=r"fault of the fake rank .* use signal_rank"):
        await deployment.fail_health(0)
    # crash_rank works with any command: by a signal.
    await deployment.crash_rank(0, -signal.SIGKILL)
    with trio.fail_after(10):
        assert await deployment.wait_exit() == 128 + signal.SIGKILL


async def test_open_harness_outside_the_fixture_cleans_up() -> None:
    with trio.fail_after(60):
        async with open_harness() as harness:
            deployment = await harness.start(1, form=Form.CLI)
            tree = deployment.process_tree()
        # On the way out: shut down, exit 0, nothing left.
        assert deployment.returncode == 0
        assert await wait_pids_gone(tree.pids(), 0.0) == []
