"""The fault matrix: one test per fault, in both forms where both apply.

Each asserts the exit status, what /ready answered, and that no process of the tree is left.
This module imports only the public API and gets the harness from the opt-in plugin, as a
third-party project would.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import trio

from trio_dpsup import (
    ConfigError,
    RankState,
    RankUnhealthy,
    Supervisor,
    SupervisorConfig,
    SupervisorState,
)
from trio_dpsup.testing import (
    FAKE_RANK,
    Deployment,
    Form,
    Harness,
    free_port_range,
    open_cli_supervisor,
    read_pid_file,
)

from .conftest import FORMS

pytest_plugins = ["trio_dpsup.testing.plugin"]

#: Ranks that take half a second to stop: a window in which to watch /ready answer 503.
SLOW_STOP = ("--stop-delay", "0.5")
#: How long ranks idle before the supervisor is SIGKILLed. Trio's idle worker threads exit
#: after 10 s; a rank whose parent-death signal was tied to one would die then.
IDLE_SECONDS = float(os.environ.get("TRIO_DPSUP_TEST_IDLE_SECONDS", "60"))


async def stopping_with_503(deployment: Deployment) -> None:
    """Wait for the stop to begin; /ready must answer 503 from then on."""
    await deployment.wait_for_state(SupervisorState.STOPPING)
    assert await deployment.ready_code() == 503


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port that something else is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port_range(1)))
        sock.listen()
        yield sock.getsockname()[1]


# -- a rank fails ---------------------------------------------------------------------------


@FORMS
async def test_crash_before_ready(dpsup: Harness, form: Form) -> None:
    # Rank 0 exits half a second after it starts, while loading (once every rank process
    # exists: a failure before that is raised by start itself); rank 1 would after 10.5 s.
    rank_args = ["--ready-after", "600", "--exit-after", "{rank}0.5", "--exit-code", "3"]
    deployment = await dpsup.start(
        2, form=form, rank_args=[*rank_args, *SLOW_STOP], wait_ready=False
    )
    await stopping_with_503(deployment)
    assert await deployment.wait_exit() == 3
    assert str(await deployment.failure()) == "rank 0 exited unexpectedly: exit status 3"
    await deployment.assert_no_leftovers()


@FORMS
async def test_crash_after_ready(dpsup: Harness, form: Form) -> None:
    deployment = await dpsup.start(3, form=form, rank_args=SLOW_STOP)
    assert await deployment.ready_code() == 200
    await deployment.crash_rank(1, -signal.SIGKILL)
    await stopping_with_503(deployment)
    assert await deployment.ready_code(rank=0) == 503  # the healthy ones are stopping too
    assert await deployment.wait_exit() == 137
    assert str(await deployment.failure()) == "rank 1 exited unexpectedly: killed by SIGKILL"
    await deployment.assert_no_leftovers()


@FORMS
async def test_exit_zero_that_was_not_asked_for_is_a_failure(dpsup: Harness, form: Form) -> None:
    deployment = await dpsup.start(2, form=form, rank_args=SLOW_STOP)
    await deployment.crash_rank(1, 0)
    await stopping_with_503(deployment)
    assert await deployment.wait_exit() == 1
    assert str(await deployment.failure()) == "rank 1 exited unexpectedly: exit status 0"
    await deployment.assert_no_leftovers()


@FORMS
async def test_503_after_ready(dpsup: Harness, form: Form) -> None:
    deployment = await dpsup.start(2, form=form, rank_args=SLOW_STOP)
    await deployment.fail_health(0, 503)
    await stopping_with_503(deployment)
    assert await deployment.wait_exit() == 1
    failure = "rank 0 is unhealthy: 2 consecutive probe failures, last: HTTP 503"
    assert str(await deployment.failure()) == failure
    await deployment.assert_no_leftovers()


@FORMS
async def test_health_hang_fails_by_probe_timeout(dpsup: Harness, form: Form) -> None:
    deployment = await dpsup.start(2, form=form, rank_args=SLOW_STOP, probe_timeout=0.3)
    await deployment.hang_health(1)
    await stopping_with_503(deployment)
    assert await deployment.wait_exit() == 1
    failure = await deployment.failure()
    assert isinstance(failure, RankUnhealthy)
    assert (failure.rank, failure.failures) == (1, 2)
    assert str(failure).startswith(
        "rank 1 is unhealthy: 2 consecutive probe failures, last: no answer"
    )
    await deployment.assert_no_leftovers()


@FORMS
async def test_start_slower_than_the_startup_timeout(dpsup: Harness, form: Form) -> None:
    rank_args = ["--ready-after", "600", *SLOW_STOP]
    deployment = await dpsup.start(
        2, form=form, rank_args=rank_args, startup_timeout=1.0, wait_ready=False
    )
    assert await deployment.ready_code() == 503
    await stopping_with_503(deployment)
    assert await deployment.wait_exit() == 1
    assert str(await deployment.failure()) == "startup timed out after 1s; ranks not ready: 0, 1"
    await deployment.assert_no_leftovers()


@FORMS
async def test_two_ranks_failing_at_once_report_the_first(dpsup: Harness, form: Form) -> None:
    # Ranks 0 and 1 exit within a millisecond or two of each other, each with its own status:
    # the exit status must be that of the failure reported, never overwritten by the second.
    deployment = await dpsup.start(3, form=form, rank_args=SLOW_STOP)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deployment.crash_rank, 0, 10)
        nursery.start_soon(deployment.crash_rank, 1, 11)
    await stopping_with_503(deployment)
    status = await deployment.wait_exit()
    assert status in (10, 11)
    assert (
        str(await deployment.failure())
        == f"rank {status - 10} exited unexpectedly: exit status {status}"
    )
    await deployment.assert_no_leftovers()


async def test_rank_port_already_taken(tmp_path: Path) -> None:
    """A taken rank port is bad input: exit 2 naming the holder, and no rank started (it
    would only crash on bind, or answer probes in the stranger's place)."""
    base = free_port_range(2)
    pid_file = tmp_path / "pids"
    command = (*FAKE_RANK, "--port", "{port}", "--pid-file", str(pid_file))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        args = ["--ranks", "2", "--gpus-per-rank", "0", "--base-port", str(base)]
        async with open_cli_supervisor([*args, "--control-port", "0", "--", *command]) as cli:
            assert await cli.wait() == 2
        config = SupervisorConfig(command=command, ranks=2, gpus_per_rank=0, base_port=base)
        with pytest.raises(ConfigError) as raised:
            await Supervisor(config).run()
    expected = f"port {base + 1} of rank 1 is in use by pid {os.getpid()} ("
    for message in (cli.log, str(raised.value)):
        assert expected in message
        assert "; not ours): stop it, or choose another --base-port" in message
    assert not pid_file.exists(), "a rank was started"


# -- shutdown -------------------------------------------------------------------------------


@FORMS
async def test_grandchildren_of_every_kind_are_stopped(
    dpsup: Harness, form: Form, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pids"
    rank_args = ["--pid-file", str(pid_file)]
    for kind in ("group", "setsid", "double-fork"):
        rank_args += ["--grandchild", kind]
    deployment = await dpsup.start(1, form=form, rank_args=rank_args)
    started = read_pid_file(pid_file)
    assert set(started) == {
        "rank",
        "grandchild-group",
        "grandchild-setsid",
        "grandchild-double-fork",
    }
    tree = deployment.process_tree()
    assert set(tree.ranks[0]) == set(started.values())
    assert len(tree.guardian) == 1
    deployment.signal_supervisor(signal.SIGTERM)
    await stopping_with_503(deployment)  # the grandchildren ignore nothing, but take no time
    assert await deployment.wait_exit() == 0
    await deployment.assert_no_leftovers()


@FORMS
async def test_rank_ignoring_sigterm_is_killed_at_the_grace_deadline(
    dpsup: Harness, form: Form
) -> None:
    deployment = await dpsup.start(2, form=form, rank_args=["--ignore-sigterm"], grace_period=1.0)
    start = trio.current_time()
    deployment.signal_supervisor(signal.SIGTERM)
    await stopping_with_503(deployment)
    # Exit status 1: a rank had to be killed. How long beyond the deadline is measured by
    # bench/; here, that the grace period was given whole and not much more.
    with trio.fail_after(10.0):
        assert await deployment.wait_exit() == 1
    elapsed = trio.current_time() - start
    assert 1.0 <= elapsed < 8.0, f"{elapsed:.2f} s for a 1 s grace period"
    assert (await deployment.failure()) is None
    await deployment.assert_no_leftovers()


@FORMS
async def test_sigint_twice_escalates_to_the_kill(dpsup: Harness, form: Form) -> None:
    deployment = await dpsup.start(2, form=form, rank_args=["--ignore-sigint"], grace_period=120)
    deployment.signal_supervisor(signal.SIGINT)
    await stopping_with_503(deployment)
    await deployment.signal_supervisor_again(signal.SIGINT)
    # Far less than the 120 s grace period.
    with trio.fail_after(10.0):
        assert await deployment.wait_exit() == 1
    await deployment.assert_no_leftovers()


@FORMS
async def test_sigterm_during_startup(dpsup: Harness, form: Form) -> None:
    rank_args = ["--ready-after", "600", *SLOW_STOP]
    deployment = await dpsup.start(2, form=form, rank_args=rank_args, wait_ready=False)
    await deployment.wait_for_rank_state(1, RankState.STARTING)
    assert await deployment.ready_code() == 503
    deployment.signal_supervisor(signal.SIGTERM)
    await stopping_with_503(deployment)
    assert await deployment.wait_exit() == 0
    await deployment.assert_no_leftovers()


@pytest.mark.parametrize("idle", [0.0, IDLE_SECONDS], ids=["at-once", "after-idle"])
async def test_supervisor_sigkilled_takes_every_tree_along(dpsup: Harness, idle: float) -> None:
    rank_args = ["--grandchild", "setsid", "--grandchild", "double-fork"]
    deployment = await dpsup.start(2, form=Form.CLI, rank_args=rank_args)
    assert await deployment.ready_code() == 200
    tree = deployment.process_tree()
    assert [len(pids) for pids in tree.ranks.values()] == [3, 3]
    await trio.sleep(idle)  # the idle period under test, not synchronisation
    assert deployment.process_tree() == tree, "a process died while idle"
    deployment.signal_supervisor(signal.SIGKILL)
    assert await deployment.wait_exit() == -signal.SIGKILL
    # Ranks by their parent-death signal, their grandchildren by the guardian.
    await deployment.assert_no_leftovers(grace=2.0)


# -- bad input: nothing starts --------------------------------------------------------------


async def test_control_port_taken_cli(taken_port: int, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    base = free_port_range(1)
    args = [
        "--ranks", "1", "--base-port", str(base), "--control-port", str(taken_port),
        "--", *FAKE_RANK, "--port", "{port}", "--pid-file", str(pid_file),
    ]  # fmt: skip
    async with open_cli_supervisor(args) as cli:
        assert await cli.wait() == 2
    assert f"cannot listen on --control-host 127.0.0.1 --control-port {taken_port}" in cli.log
    assert not pid_file.exists(), "a rank was started"


async def test_control_port_taken_library(taken_port: int, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    command = (*FAKE_RANK, "--port", "{port}", "--pid-file", str(pid_file))
    config = SupervisorConfig(
        command=command, ranks=1, base_port=free_port_range(1), control_port=taken_port
    )
    with pytest.raises(ConfigError, match=f"--control-port {taken_port}: Address already in use"):
        await Supervisor(config).run()
    assert not pid_file.exists(), "a rank was started"
    assert psutil.Process().children() == []


# -- the library form, over and over --------------------------------------------------------


async def test_fifty_library_cycles_leave_no_child_zombie_or_fd() -> None:
    me = psutil.Process()
    fds_after_warmup = 0
    for cycle in range(50):
        config = SupervisorConfig(
            command=(*FAKE_RANK, "--port", "{port}"),
            ranks=1,
            base_port=free_port_range(1),
            control_port=0,
            startup_probe_interval=0.01,
        )
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                handle = await nursery.start(Supervisor(config).run)
                await handle.wait_ready()
                handle.request_shutdown()
                assert await handle.wait_stopped() == 0
        assert me.children() == [], f"cycle {cycle}: children left"
        if cycle == 4:  # by now every lazily opened resource (thread pools, sockets) exists
            fds_after_warmup = me.num_fds()
    assert me.num_fds() <= fds_after_warmup, "file descriptors leak across cycles"
