"""Restart policies: a failed rank comes back on its port; crash loops escalate; scope all;
shutdown during backoff; --min-ready. Each checks that no process is left behind."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from trio_dpsup import (
    GpuFailed,
    RankExited,
    RankStartTimeout,
    RankState,
    RankStatus,
    RestartedWith,
    RestartPolicy,
    RestartScope,
    RestartsExhausted,
    SupervisorState,
    SupervisorStatus,
)
from trio_dpsup._ranks.restart import Restarter  # the policy's arithmetic, on purpose
from trio_dpsup.testing import (
    Deployment,
    Fault,
    Form,
    Harness,
    free_port_range,
    inject_fault,
    open_cli_supervisor,
    wait_pids_gone,
)

from .conftest import FORMS, cli_args, on_failure

pytest_plugins = ["trio_dpsup.testing.plugin"]

#: Restart on failure, quickly: 50-100 ms of backoff.
QUICK = on_failure(0.1)


def rank(status: SupervisorStatus, r: int) -> RankStatus:
    return next(x for x in status.ranks if x.rank == r)


async def ready_again(deployment: Deployment, r: int, restarts: int) -> SupervisorStatus:
    return await deployment.wait_for_status(
        lambda s: rank(s, r).restarts == restarts and rank(s, r).state is RankState.READY,
        f"rank {r} ready after {restarts} restart(s)",
    )


def causes(rank_status: RankStatus) -> list[str]:
    return [str(cause) for cause in rank_status.last_causes]


@FORMS
async def test_a_crashed_rank_comes_back_on_its_port(dpsup: Harness, form: Form) -> None:
    deployment = await dpsup.start(3, form=form, **QUICK)
    before = await deployment.status()
    old_pid = rank(before, 1).pid
    await deployment.crash_rank(1, 3)
    after = await ready_again(deployment, 1, 1)
    assert rank(after, 1).pid != old_pid
    assert rank(after, 1).port == rank(before, 1).port
    (cause,) = rank(after, 1).last_causes
    assert isinstance(cause, RankExited)
    assert (cause.rank, cause.returncode) == (1, 3)
    assert str(cause) == "rank 1 exited unexpectedly: exit status 3"
    # The other ranks were never touched, and the old process is gone.
    assert [rank(after, r).pid for r in (0, 2)] == [rank(before, r).pid for r in (0, 2)]
    assert await deployment.ready_code() == 200
    deployment.signal_supervisor(signal.SIGTERM)
    assert await deployment.wait_exit() == 0
    await deployment.assert_no_leftovers()


async def test_a_restart_takes_the_old_tree_along(dpsup: Harness) -> None:
    deployment = await dpsup.start(1, rank_args=["--grandchild", "setsid"], **QUICK)
    old = deployment.process_tree().ranks[0]
    assert len(old) == 2  # the rank and its setsid grandchild
    await deployment.crash_rank(0, 3)
    await ready_again(deployment, 0, 1)
    assert await wait_pids_gone(old, 5.0) == []
    assert set(deployment.process_tree().ranks[0]).isdisjoint(old)


async def test_a_restarted_rank_has_its_own_startup_deadline(
    dpsup: Harness, tmp_path: Path
) -> None:
    fault = tmp_path / "unhealthy"
    rank_args = ["--unhealthy-if-exists", str(fault)]
    deployment = await dpsup.start(
        2, rank_args=rank_args, **on_failure(0.1, startup_timeout=1.0, max_restarts=2)
    )
    fault.touch()  # from now on no process of any rank is healthy, restarted or not
    with trio.fail_after(30):
        assert await deployment.wait_exit() == 1
    failure = await deployment.failure()
    assert isinstance(failure, RestartsExhausted)
    assert isinstance(failure.last, RankStartTimeout)
    assert str(failure).startswith("more than 2 restart(s) within 60s; last: rank ")
    assert str(failure).endswith("did not become ready within 1s of its restart")
    await deployment.assert_no_leftovers()


async def test_an_unhealthy_rank_is_restarted(dpsup: Harness) -> None:
    deployment = await dpsup.start(2, **QUICK)
    await deployment.fail_health(0, 500)  # the new process is healthy again
    status = await ready_again(deployment, 0, 1)
    assert causes(rank(status, 0)) == [
        "rank 0 is unhealthy: 2 consecutive probe failures, last: HTTP 500"
    ]
    assert await deployment.ready_code() == 200


async def test_crash_loop_escalates_with_the_last_cause(dpsup: Harness) -> None:
    # Every process of every rank exits 0.3 s after it starts, with status 7.
    rank_args = ["--exit-after", "0.3", "--exit-code", "7"]
    deployment = await dpsup.start(
        2,
        rank_args=rank_args,
        wait_ready=False,
        **on_failure(0.1, max_restarts=3, restart_window=60),
    )
    with trio.fail_after(30):
        assert await deployment.wait_exit() == 7  # the root cause's status
    failure = await deployment.failure()
    assert isinstance(failure, RestartsExhausted)
    assert (failure.max_restarts, failure.window) == (3, 60)
    assert isinstance(failure.last, RankExited)
    assert failure.last.returncode == 7
    assert str(failure).startswith("more than 3 restart(s) within 60s; last: rank ")
    assert str(failure).endswith("exited unexpectedly: exit status 7")
    await deployment.assert_no_leftovers()


@pytest.mark.parametrize("policy", [RestartPolicy.ON_FAILURE, RestartPolicy.ALWAYS])
async def test_exit_zero_is_restarted_like_any_failure(
    dpsup: Harness, policy: RestartPolicy
) -> None:
    settings = on_failure(0.1, restart=policy)
    if policy is RestartPolicy.ALWAYS:  # deprecated: on-failure, with a warning
        with pytest.warns(FutureWarning, match="--restart always is the same as on-failure"):
            deployment = await dpsup.start(2, **settings)
    else:
        deployment = await dpsup.start(2, **settings)
    await deployment.crash_rank(0, 0)
    status = await ready_again(deployment, 0, 1)
    assert causes(rank(status, 0)) == ["rank 0 exited unexpectedly: exit status 0"]


@FORMS
async def test_a_rank_bounced_by_hand_comes_back(dpsup: Harness, form: Form) -> None:
    """`kill -TERM <rank pid>` under on-failure: the node stays up, the rank comes back on
    its port with one restart, and the other ranks are untouched."""
    # The fake rank closes its listener before it exits, as a server shutting down does:
    # with the fast probes' confirmation (2 failures, 30 ms apart), a loaded machine could
    # see that first and call it unhealthy. Slower confirmation (3 more probes, 0.2 s
    # apart) leaves the exit, the cause under test, to be seen first.
    confirm_slowly = on_failure(0.1, failure_threshold=4, suspect_interval=0.2)
    deployment = await dpsup.start(3, form=form, **confirm_slowly)
    before = await deployment.status()
    await deployment.signal_rank(1, signal.SIGTERM)
    with trio.fail_after(30):
        after = await ready_again(deployment, 1, 1)
    assert after.state is SupervisorState.READY
    assert await deployment.ready_code() == 200
    assert rank(after, 1).port == rank(before, 1).port
    assert rank(after, 1).pid != rank(before, 1).pid
    (cause,) = rank(after, 1).last_causes
    assert isinstance(cause, RankExited)  # the fake rank exits 0 on SIGTERM, as vLLM does
    assert cause.returncode == 0
    untouched = [(r.pid, r.restarts) for r in after.ranks if r.rank != 1]
    assert untouched == [(r.pid, 0) for r in before.ranks if r.rank != 1]
    deployment.signal_supervisor(signal.SIGTERM)
    assert await deployment.wait_exit() == 0
    await deployment.assert_no_leftovers()


async def test_scope_all_restarts_every_rank(dpsup: Harness) -> None:
    deployment = await dpsup.start(3, **on_failure(0.1, restart_scope=RestartScope.ALL))
    before = await deployment.status()
    await deployment.crash_rank(2, 1)
    after = await deployment.wait_for_status(
        lambda s: all(r.restarts == 1 and r.state is RankState.READY for r in s.ranks),
        "every rank restarted once and ready",
    )
    assert all(a.pid != b.pid for a, b in zip(after.ranks, before.ranks, strict=True))
    (cause,) = rank(after, 0).last_causes
    assert isinstance(cause, RestartedWith)
    assert isinstance(cause.cause, RankExited)
    assert (cause.rank, cause.cause.rank) == (0, 2)
    assert str(cause) == "restarted with rank 2: rank 2 exited unexpectedly: exit status 1"
    deployment.signal_supervisor(signal.SIGTERM)
    assert await deployment.wait_exit() == 0
    await deployment.assert_no_leftovers()


@FORMS
async def test_shutdown_during_backoff(dpsup: Harness, form: Form) -> None:
    settings = on_failure(60.0)
    deployment = await dpsup.start(2, form=form, **settings)
    await deployment.crash_rank(1, 3)
    await deployment.wait_for_rank_state(1, RankState.RESTARTING)
    with trio.fail_after(10):  # far less than the 30-60 s backoff
        deployment.signal_supervisor(signal.SIGTERM)
        assert await deployment.wait_exit() == 0
    await deployment.assert_no_leftovers()


async def test_min_ready_keeps_serving_while_a_rank_restarts(dpsup: Harness) -> None:
    deployment = await dpsup.start(3, **on_failure(60.0, min_ready=2))
    await deployment.crash_rank(2, 3)
    await deployment.wait_for_rank_state(2, RankState.RESTARTING)
    assert await deployment.ready_code() == 200  # 2 of 3 ready
    assert await deployment.ready_code(rank=2) == 503
    status = await deployment.status()
    assert (status.ready, status.min_ready) == (True, 2)
    strict = await dpsup.start(2, **on_failure(60.0))  # min-ready defaults to every rank
    await strict.crash_rank(0, 3)
    await strict.wait_for_rank_state(0, RankState.RESTARTING)
    assert await strict.ready_code() == 503
    async with httpx.AsyncClient() as client:
        startupz = await client.get(f"{strict.control_url}/startupz")
        ready = await client.get(f"{strict.control_url}/ready")
    assert startupz.status_code == 200  # reached once, it stays
    assert ready.text == "degraded: ranks not ready: 0\n"


def test_backoff_doubles_within_bounds_with_jitter() -> None:
    restarter = Restarter(
        RestartPolicy.ON_FAILURE, RestartScope.RANK,
        max_restarts=10, window=60, backoff_min=1.0, backoff_max=8.0,
    )  # fmt: skip
    for n, ceiling in ((1, 2.0), (2, 4.0), (3, 8.0), (4, 8.0), (9, 8.0)):
        delays = [restarter.backoff(n) for _ in range(50)]
        assert all(max(1.0, ceiling / 2) <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered


async def test_restart_intensity_window(autojump_clock: trio.testing.MockClock) -> None:
    restarter = Restarter(
        RestartPolicy.ON_FAILURE, RestartScope.RANK,
        max_restarts=2, window=60, backoff_min=1.0, backoff_max=1.0,
    )  # fmt: skip
    crash = RankExited(0, 3)
    assert restarter.decide(crash) is None
    assert restarter.decide(crash) is None
    escalated = restarter.decide(crash)
    assert escalated is not None
    assert escalated.exit_status == 3
    gpu = GpuFailed(0, "GPU 0", "critical Xid error 79")
    assert restarter.decide(gpu) is gpu  # a restart cannot mend a GPU: stop everything
    # The window, exercised past its end.
    await trio.sleep(30)  # the two restarts at 0 s are still within 60 s
    assert isinstance(restarter.decide(crash), RestartsExhausted)
    await trio.sleep(31)  # now both have left it: a crash restarts again
    assert restarter.decide(crash) is None
    assert restarter.recent([0.0, trio.current_time() - 10]) == 1


@FORMS
async def test_a_second_signal_reaches_a_rank_that_is_restarting(
    dpsup: Harness, form: Form
) -> None:
    # Rank 0 fails its probes and ignores SIGTERM: its restart's stop waits out a grace
    # period of 30 s of its own. A second signal must end that wait too, not only the
    # shutdown's.
    deployment = await dpsup.start(
        2, form=form, rank_args=["--ignore-sigterm"], **on_failure(0.1, grace_period=30)
    )
    await deployment.fail_health(0, 503)
    await deployment.wait_for_rank_state(0, RankState.RESTARTING)
    deployment.signal_supervisor(signal.SIGTERM)
    await deployment.signal_supervisor_again(signal.SIGTERM)
    start = trio.current_time()
    with trio.fail_after(10):
        assert await deployment.wait_exit() == 1  # ranks had to be killed
    assert trio.current_time() - start < 3.0  # not the 30 s of the restart's grace period
    await deployment.assert_no_leftovers()


async def test_restart_always_is_deprecated_in_the_cli_too() -> None:
    # The warning is one record of our log; the run is on-failure's.
    base = free_port_range(1)
    args = cli_args(1, base, options=["--restart", "always", "--restart-backoff-min", "0.1"])
    async with open_cli_supervisor(args) as sup:
        await sup.wait_ready()
        mark = len(sup.lines)
        await inject_fault(base, Fault.exit(0))
        await sup.wait_for_line(r"rank 0 is ready", after=mark)  # again, after its restart
        assert (await sup.status()).ranks[0].restarts == 1
        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 0
    (warning,) = [line for line in sup.lines if "always is the same" in line]
    assert "WARNING" in warning
    assert "pass --restart on-failure" in warning
