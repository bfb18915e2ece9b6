"""Signals as they really arrive: during start, of every kind a service manager sends, and
twice in a few milliseconds."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from trio_dpsup.testing import (
    Form,
    Harness,
    alive,
    free_port_range,
    open_cli_supervisor,
    read_pid_file,
)

from .conftest import FORMS, all_holders_gone, cli_args, kill_holders

pytest_plugins = ["trio_dpsup.testing.plugin"]


async def test_sigterm_while_ranks_are_being_started_stops_in_order(tmp_path: Path) -> None:
    ranks = 100
    base = free_port_range(ranks)
    pid_files = tmp_path / "pids-{rank}"
    rank_args = ["--pid-file", str(pid_files), "--ready-after", "600"]
    async with open_cli_supervisor(cli_args(ranks, base, rank_args=rank_args)) as sup:
        await sup.wait_for_line(r"rank 0 started")
        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 0  # an ordered shutdown, not death by the signal
    assert "shutdown requested (SIGTERM)" in sup.log
    assert "stopped cleanly" in sup.log
    # No rank is started once the request is seen: far fewer than all of them were.
    started = sup.log.count(" started: pid ")
    assert 1 <= started < ranks // 2, started
    for rank in range(ranks):
        path = tmp_path / f"pids-{rank}"
        if path.exists():
            assert not alive(read_pid_file(path)["rank"])


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT])
async def test_sighup_and_sigquit_shut_down_like_sigterm(
    tmp_path: Path, signum: signal.Signals
) -> None:
    base = free_port_range(2)
    events = tmp_path / "events-{rank}"
    rank_args = ["--events-file", str(events)]
    async with open_cli_supervisor(cli_args(2, base, rank_args=rank_args)) as sup:
        await sup.wait_ready()
        sup.send_signal(signum)
        assert await sup.wait() == 0
    assert f"{signum.name}: shutting down as for SIGTERM" in sup.log
    for rank in range(2):
        # The ranks got SIGTERM from us, not a parent-death SIGKILL.
        assert '"event": "sigterm"' in (tmp_path / f"events-{rank}").read_text()


async def test_sigterm_twice_within_milliseconds_is_one_request() -> None:
    # coreutils' timeout sends SIGTERM to us and then to our group: the rank that ignores
    # SIGTERM still gets its whole grace period (3 s), not an immediate SIGKILL.
    base = free_port_range(1)
    options = ["--grace-period", "3"]  # the last one given wins
    args = cli_args(1, base, options=options, rank_args=["--ignore-sigterm"])
    async with open_cli_supervisor(args) as sup:
        await sup.wait_ready()
        start = trio.current_time()
        os.kill(sup.pid, signal.SIGTERM)
        await trio.sleep(0.005)  # the gap under test
        os.kill(sup.pid, signal.SIGTERM)
        assert await sup.wait() == 1  # the rank had to be killed at the end of the grace
        elapsed = trio.current_time() - start
    assert elapsed >= 2.5, f"the grace period was cut short: {elapsed:.2f} s"
    assert "the same request" in sup.log


async def test_cgroups_hold_what_leaves_session_cookie_and_parent(tmp_path: Path) -> None:
    lock = tmp_path / "tree.lock"
    lock.touch()
    base = free_port_range(1)
    rank_args = ["--lock-file", str(lock), "--grandchild", "setsid-setproctitle"]
    args = cli_args(1, base, options=["--cgroups"], rank_args=rank_args)
    async with open_cli_supervisor(args) as sup:
        try:
            await sup.wait_ready()
        except AssertionError:
            if "--cgroups needs a writable cgroup v2" in sup.log:
                pytest.skip("no writable cgroup v2 here")
            raise
        rank_pid = (await sup.status()).ranks[0].pid
        assert rank_pid is not None
        cgroup = Path(f"/proc/{rank_pid}/cgroup").read_text()  # noqa: ASYNC240
        assert "/trio-dpsup-" in cgroup
        assert "/rank-0" in cgroup
        sup.send_signal(signal.SIGKILL)
        assert await sup.wait() == -signal.SIGKILL
    try:
        assert await all_holders_gone(lock, within=10)
    finally:
        kill_holders(lock)


@FORMS
async def test_a_stopped_rank_stops_at_once_on_sigterm(dpsup: Harness, form: Form) -> None:
    # SIGSTOP (or a job-control stop, or a debugger cut off mid-attach): a SIGTERM alone
    # waits until the process runs again, so it used to hold the whole grace period and end
    # in a SIGKILL (exit 1). Probes are slow here so the stop is not first seen as a failure.
    deployment = await dpsup.start(2, form=form, probe_interval=30.0, grace_period=20.0)
    await deployment.signal_rank(1, signal.SIGSTOP)
    start = trio.current_time()
    deployment.signal_supervisor(signal.SIGTERM)
    with trio.fail_after(15):
        assert await deployment.wait_exit() == 0  # 1 when a rank had to be killed
    assert trio.current_time() - start < 5.0  # the promise is 1 s; far below 20 s of grace
