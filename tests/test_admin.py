"""The operator socket and `trio-dpsup ctl`, against real supervisors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import trio

from trio_dpsup import DrainEnd, RankState, RankUnhealthy, RestartRequested, SupervisorState
from trio_dpsup.testing import (
    CLI,
    FAKE_RANK,
    CliResult,
    Deployment,
    Form,
    Harness,
    alive,
    free_port_range,
    run_cli,
)
from trio_dpsup.testing.fake_rank import METRIC_NAMES

from .conftest import FORMS, cli_args, on_failure

pytest_plugins = ["trio_dpsup.testing.plugin"]

#: The fake rank's busy gauge: what its "requests in flight" read as.
BUSY = METRIC_NAMES["fake"][0]


async def ctl(socket_path: Path, *args: str) -> CliResult:
    with trio.fail_after(60):
        return await run_cli(["ctl", "--admin-socket", str(socket_path), *args])


async def ready_again(deployment: Deployment, rank: int, restarts: int) -> None:
    with trio.fail_after(20):
        await deployment.wait_for_status(
            lambda s: s.ranks[rank].restarts == restarts and s.ranks[rank].state is RankState.READY,
            f"rank {rank} ready after {restarts} restart(s)",
        )


@FORMS
async def test_restart_one_rank_alone(dpsup: Harness, form: Form, tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    deployment = await dpsup.start(3, form=form, admin_socket=str(sock), min_ready=2)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    before = await deployment.status()
    code, out, err = await ctl(sock, "restart", "2")
    assert (code, out.strip(), err) == (0, "rank 2 restarting", "")
    await ready_again(deployment, 2, 1)
    after = await deployment.status()
    assert [r.pid for r in after.ranks[:2]] == [r.pid for r in before.ranks[:2]]
    assert after.ranks[2].pid != before.ranks[2].pid
    (cause,) = after.ranks[2].last_causes
    assert isinstance(cause, RestartRequested)
    code, out, _ = await ctl(sock, "status")
    assert code == 0
    assert out.splitlines()[0] == f"ready, run {deployment.run_id}"
    assert out.splitlines()[1].split() == [
        "RANK", "STATE", "PID", "PORT", "GPUS", "(MIB", "USED)", "LAST", "PROBE", "RESTARTS",
        "UP",
    ]  # fmt: skip
    deployment.signal_supervisor(2 if form is Form.CLI else 15)
    await deployment.wait_exit()
    await deployment.assert_no_leftovers()
    assert not sock.exists(), "the socket file is removed at exit"


async def test_rolling_restart_keeps_ready_throughout(dpsup: Harness, tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    deployment = await dpsup.start(3, form=Form.CLI, admin_socket=str(sock), min_ready=2)
    codes: list[int] = []
    done = trio.Event()

    async def watch_ready() -> None:
        async with httpx.AsyncClient(base_url=deployment.control_url, trust_env=False) as c:
            while not done.is_set():  # bounded by the rolling restart below
                codes.append((await c.get("/ready")).status_code)
                await trio.sleep(0.01)  # pacing the reads

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_ready)
        code, out, err = await ctl(sock, "rolling-restart")
        done.set()
    assert (code, out.strip(), err) == (0, "restarted ranks 0, 1, 2, at most 1 out at a time", "")
    assert len(codes) > 10
    assert set(codes) == {200}, f"/ready was not 200 throughout: {sorted(set(codes))}"
    status = await deployment.status()
    assert [r.restarts for r in status.ranks] == [1, 1, 1]
    deployment.signal_supervisor(15)
    assert await deployment.wait_exit() == 0
    await deployment.assert_no_leftovers()


async def test_drain_pause_and_the_metrics(dpsup: Harness, tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    deployment = await dpsup.start(2, admin_socket=str(sock), probe_interval=0.1, min_ready=1)
    assert (await ctl(sock, "drain", "1"))[:2] == (0, "rank 1 drained\n")
    assert await deployment.ready_code(rank=1) == 503
    assert await deployment.ready_code() == 200  # the node still serves
    async with httpx.AsyncClient(base_url=deployment.control_url, trust_env=False) as client:
        ranks = (await client.get("/ranks")).json()["ranks"]
        assert [(r["ready"], r["drained"]) for r in ranks] == [(True, False), (False, True)]
        assert (await ctl(sock, "undrain", "1"))[0] == 0
        assert await deployment.ready_code(rank=1) == 200
        assert (await ctl(sock, "pause-probes", "0", "30"))[:2] == (
            0, "rank 0: probes paused for 30s\n",
        )  # fmt: skip
        # The pause shows wherever the operator looks: /status, ctl status, /metrics.
        status = await deployment.status()
        paused_until = status.ranks[0].probes_paused_until
        assert paused_until is not None
        assert 25 < paused_until - time.time() <= 30
        assert status.ranks[1].probes_paused_until is None
        table = (await ctl(sock, "status"))[1].splitlines()
        assert "(probes paused 0m" in table[2]
        assert "paused" not in table[3]
        metrics = (await client.get("/metrics")).text
        assert 'trio_dpsup_rank_probes_paused{rank="0"} 1.0' in metrics
        assert 'trio_dpsup_rank_probes_paused{rank="1"} 0.0' in metrics
        assert (await ctl(sock, "resume-probes", "0"))[:2] == (0, "rank 0: probes resumed\n")
        assert (await deployment.status()).ranks[0].probes_paused_until is None
        metrics = (await client.get("/metrics")).text
        assert 'trio_dpsup_rank_probes_paused{rank="0"} 0.0' in metrics
        for action in ("drain", "undrain", "pause-probes", "resume-probes"):
            assert f'trio_dpsup_admin_actions_total{{action="{action}"}} 1.0' in metrics
        # Paused, a failing rank is not probed; resumed, it is.
        assert (await ctl(sock, "pause-probes", "0", "30"))[0] == 0
        await deployment.fail_health(0, 500)
        await trio.sleep(0.5)  # the period under test: five probe intervals, none probed
        assert (await deployment.status()).state is SupervisorState.READY
        assert (await ctl(sock, "resume-probes", "0"))[0] == 0
    assert await deployment.wait_exit() == 1
    assert isinstance(await deployment.failure(), RankUnhealthy)


async def test_drain_and_restart_respect_min_ready_as_a_disruption_budget(
    dpsup: Harness, tmp_path: Path
) -> None:
    sock = tmp_path / "admin.sock"
    deployment = await dpsup.start(3, admin_socket=str(sock))  # --min-ready: all 3
    for action in ("drain", "restart"):
        code, out, err = await ctl(sock, action, "1")
        assert (code, out) == (2, "")
        doing = "draining" if action == "drain" else "restarting"
        assert err == (
            f"trio-dpsup ctl: error: {doing} rank 1 would leave 2 of 3 ranks serving, below "
            "--min-ready 3: pass --force (/ready answers 503 until enough are back), or run "
            "the supervisor with --min-ready 2\n"
        )
    assert await deployment.ready_code() == 200
    # --force overrides the budget, and /ready tells the truth.
    assert (await ctl(sock, "drain", "1", "--force"))[:2] == (0, "rank 1 drained\n")
    assert await deployment.ready_code() == 503
    for rank in ("0", "2"):
        assert (await ctl(sock, "drain", rank, "--force"))[0] == 0
    assert await deployment.ready_code() == 503, "every rank drained: nothing serves"
    for rank in ("0", "1", "2"):
        assert (await ctl(sock, "undrain", rank))[0] == 0
    assert await deployment.ready_code() == 200


async def test_a_rolling_restart_under_the_default_min_ready_and_one_operation_at_a_time(
    dpsup: Harness, tmp_path: Path
) -> None:
    sock = tmp_path / "admin.sock"
    deployment = await dpsup.start(3, admin_socket=str(sock), rank_args=["--ready-after", "1"])
    code, _, err = await ctl(sock, "rolling-restart")
    assert code == 2
    assert err.endswith(
        "--min-ready 3 leaves no room among 3 ranks: pass --max-unavailable 1 (/ready answers "
        "503 while a rank is out), or run the supervisor with --min-ready 2\n"
    )
    codes: set[int] = set()
    answers: list[tuple[int, str, str]] = []
    rolling = trio.Event()

    async def roll() -> None:
        rolling.set()
        answers.append(await ctl(sock, "rolling-restart", "--max-unavailable", "1"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(roll)
        await rolling.wait()
        # While it rolls (each rank takes a second to be ready), any change is refused.
        await deployment.wait_for_status(
            lambda s: any(r.state is not RankState.READY for r in s.ranks), "a rank out"
        )
        codes.add(await deployment.ready_code())
        code, _, err = await ctl(sock, "restart", "2", "--force")
        assert code == 2
        assert err.startswith("trio-dpsup ctl: error: busy: a rolling restart (rank ")
        assert err.endswith(
            "is in progress; try again when it ends (trio-dpsup ctl status shows it)\n"
        )
        table = (await ctl(sock, "status"))[1]
        assert "; a rolling restart (rank " in table.splitlines()[0]
    ((code, out, err),) = answers
    assert (code, out.strip(), err) == (0, "restarted ranks 0, 1, 2, at most 1 out at a time", "")
    assert codes == {503}, "/ready tells the truth while a rank is out"
    assert await deployment.ready_code() == 200
    assert [r.restarts for r in (await deployment.status()).ranks] == [1, 1, 1]


def fake_rank_where(test: str, *more: str) -> list[str]:
    """A fake rank, given `more` arguments where the shell `test` holds at its start."""
    fake = " ".join(FAKE_RANK)
    return [
        "sh", "-c",
        f"if [ {test} ]; then exec {fake} --port {{port}} {' '.join(more)}; "
        f"else exec {fake} --port {{port}}; fi",
    ]  # fmt: skip


async def test_a_rolling_restart_skips_a_crash_looping_rank(dpsup: Harness, tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    # Rank 1 exits a second after each start, and is restarted each time.
    command = fake_rank_where('"{rank}" = 1', "--exit-after", "1")
    deployment = await dpsup.start(
        3, command=command,
        **on_failure(0.05, admin_socket=str(sock), min_ready=1, max_restarts=1000),
    )  # fmt: skip
    await deployment.wait_for_status(lambda s: s.ranks[1].restarts >= 1, "rank 1 restarted")
    code, out, err = await ctl(sock, "rolling-restart", "--rank-timeout", "20")
    assert (code, err) == (0, "")
    assert out.startswith("restarted ranks 0, 2, at most 2 out at a time; skipped rank 1: ")
    status = await deployment.status()
    assert status.state is SupervisorState.READY
    assert status.ranks[0].restarts == 1
    assert status.ranks[2].restarts == 1


async def test_a_rank_that_does_not_return_ends_the_roll(dpsup: Harness, tmp_path: Path) -> None:
    sock, fault = tmp_path / "admin.sock", tmp_path / "never-ready"
    # A rank process started while `fault` exists never becomes ready.
    command = fake_rank_where(f"-e {fault}", "--ready-after", "3600")
    deployment = await dpsup.start(2, command=command, admin_socket=str(sock), min_ready=1)
    fault.touch()
    with trio.fail_after(30):
        code, out, err = await ctl(sock, "rolling-restart", "--rank-timeout", "1")
    assert (code, out) == (2, "")
    assert err == (
        "trio-dpsup ctl: error: rank 0 did not return within 1s (--rank-timeout): it is "
        "starting: the rolling restart stopped; restarted: 0; skipped: none\n"
    )
    status = await deployment.status()
    assert (status.ranks[1].restarts, status.ranks[1].state) == (0, RankState.READY)
    code, _, err = await ctl(sock, "restart", "1", "--force", "--wait", "--rank-timeout", "1")
    assert code == 2  # not back in time: the same verdict for one rank
    assert err.endswith("rank 1 did not return within 1s (--rank-timeout): it is starting\n")


async def test_restart_wait_and_status_json(dpsup: Harness, tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    deployment = await dpsup.start(2, admin_socket=str(sock), min_ready=1)
    code, out, err = await ctl(sock, "restart", "0", "--wait")
    assert (code, out, err) == (0, "rank 0 ready again\n", "")
    code, out, _ = await ctl(sock, "status", "--json")
    assert code == 0
    document = json.loads(out)
    assert document["operation"] is None
    assert document["status"]["run_id"] == deployment.run_id
    assert [(r["rank"], r["state"], r["restarts"]) for r in document["status"]["ranks"]] == [
        (0, "ready", 1), (1, "ready", 0),
    ]  # fmt: skip


async def test_errors_are_one_line_and_exit_2(dpsup: Harness, tmp_path: Path) -> None:
    sock, fault = tmp_path / "admin.sock", tmp_path / "never-ready"
    # A rank process started while `fault` exists never becomes ready: rank 1, restarted
    # below, is not ready when the second restart asks, however long ctl takes to start.
    command = fake_rank_where(f"-e {fault}", "--ready-after", "3600")
    await dpsup.start(2, command=command, **on_failure(0.1, admin_socket=str(sock), min_ready=1))
    cases = [
        (("restart", "7"), "no rank 7 here: the ranks are 0-1"),
        (
            ("restart", "1", "--rank-timeout", "0"),
            "--rank-timeout must be more than 0 seconds, not 0.0",
        ),
        (
            ("rolling-restart", "--max-unavailable", "3"),
            "--max-unavailable must be within 1-2, not 3",
        ),
        (("pause-probes", "0", "-1"), "pause-probes needs SECONDS between 0 and 86400"),
    ]
    for args, message in cases:
        code, out, err = await ctl(sock, *args)
        assert (code, out) == (2, "")
        assert err.startswith("trio-dpsup ctl: error: ")
        assert err.endswith(f"{message}\n")
        assert err.count("\n") == 1
    fault.touch()
    assert (await ctl(sock, "restart", "1"))[0] == 0
    code, _, err = await ctl(sock, "restart", "1")
    assert code == 2
    # Restarting still (its stop, its backoff), or starting: never ready again.
    assert re.fullmatch(
        r"trio-dpsup ctl: error: rank 1 is (restarting|starting): restart a ready rank\n", err
    ), err
    code, _, err = await ctl(tmp_path / "nobody.sock", "status")
    assert code == 2
    assert err.startswith("trio-dpsup ctl: error: cannot reach the supervisor at ")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
async def test_a_peer_that_is_not_the_owner_is_refused(dpsup: Harness) -> None:
    # A directory another user can reach (pytest's own are 0700).
    reachable = Path(tempfile.mkdtemp(prefix="trio-dpsup-admin-"))
    os.chmod(reachable, 0o755)
    sock = reachable / "admin.sock"
    await dpsup.start(1, admin_socket=str(sock))
    # As if the socket's mode had been widened by mistake: the owner check still holds.
    os.chmod(sock, 0o666)
    nobody = (
        "import os, select, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        # A client that writes late, as a loaded machine makes any: a refusal sent (and
        # the connection closed) before the request arrived would break its write. (Within
        # the socket's 1 s for a request line: past it, any client is dropped.)
        "if select.select([s], [], [], 0.5)[0]: sys.exit('answered before the request')\n"
        's.sendall(b\'{"action": "status"}\\n\'); data = b""\n'
        # Read to the newline: one recv may return part of the answer.
        "while not data.endswith(b'\\n') and (c := s.recv(65536)): data += c\n"
        "print(data.decode())\n"
    )
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-c", nobody, str(sock)], capture_stdout=True, check=False
        )
    assert result.stdout.decode().strip() == (
        '{"ok": false, "error": "uid 65534 is neither the supervisor\'s owner (0) nor root"}'
    )
    shutil.rmtree(reachable, ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run the supervisor as another user")
async def test_root_may_use_a_service_users_socket() -> None:
    # As with the shipped unit's User=: the supervisor runs as a service user, and the
    # operator types `sudo trio-dpsup ctl status`.
    def as_nobody() -> None:
        os.setgid(65534)
        os.setuid(65534)

    try:
        probe = await trio.run_process(
            [sys.executable, "-c", "import trio_dpsup"], preexec_fn=as_nobody, check=False,
            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
        )  # fmt: skip
    except PermissionError:
        probe = None
    if probe is None or probe.returncode != 0:
        pytest.skip("this Python or checkout cannot be used by another user (nobody)")
    home = Path(tempfile.mkdtemp(prefix="trio-dpsup-service-"))
    os.chown(home, 65534, 65534)
    os.chmod(home, 0o700)
    sock = home / "admin.sock"
    args = cli_args(1, free_port_range(1), options=["--admin-socket", str(sock)])
    process = await trio.lowlevel.open_process(
        [*CLI, *args], preexec_fn=as_nobody, cwd="/",  # as another user: no run_cli
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with trio.fail_after(30):
            while True:
                code, out, _ = await ctl(sock, "status")
                if code == 0 and "ready" in out.splitlines()[2]:
                    break
                await trio.sleep(0.1)  # pacing: the socket and the rank come up in turn
    finally:
        process.terminate()
        with trio.fail_after(30):
            await process.wait()
        shutil.rmtree(home, ignore_errors=True)
    assert process.returncode == 0


async def test_a_drain_waits_for_the_requests_in_flight_and_says_how_it_ended(
    dpsup: Harness, tmp_path: Path
) -> None:
    # The fake rank's busy gauge stands for the engine's in-flight gauge. ctl's --timeout is
    # how long it waits for a word from the supervisor: the drain lasts longer than it, and
    # its progress lines keep ctl waiting.
    sock = tmp_path / "admin.sock"
    deployment = await dpsup.start(
        2, form=Form.CLI, admin_socket=str(sock), min_ready=1, inflight_metrics=(BUSY,),
        drain_timeout=30.0,
    )  # fmt: skip
    await deployment.make_busy(1, requests=2)

    async def idle_later() -> None:
        await deployment.wait_for_status(
            lambda s: s.ranks[1].drain is not None and s.ranks[1].drain.inflight == 2,
            "rank 1 draining, 2 in flight",
        )
        # The period under test: past ctl's --timeout below, and past PROGRESS_EVERY.
        await trio.sleep_until(drained_from + 6.5)
        await deployment.make_busy(1, requests=0)

    drained_from = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(idle_later)
        code, out, err = await ctl(sock, "--timeout", "6", "--progress", "drain", "1")
    took = trio.current_time() - drained_from
    assert (code, out) == (0, "rank 1 drained\n"), err
    assert "trio-dpsup ctl: still going: a drain of rank 1" in err
    assert re.search(r"trio-dpsup ctl: rank 1 drained in \d+\.\d\ds: empty\n", err), err
    assert took > 6.0, "the drain outlasted ctl's --timeout, and ctl waited"
    status = await deployment.status()
    drain = status.ranks[1].drain
    assert drain is not None
    assert drain.end is DrainEnd.EMPTY
    assert status.ranks[1].drained
    assert not status.takes_traffic(status.ranks[1])
    assert (await ctl(sock, "undrain", "1"))[0] == 0
    status = await deployment.status()
    assert status.ranks[1].drain is None
    assert status.takes_traffic(status.ranks[1])


async def test_a_rolling_restart_says_how_it_goes(dpsup: Harness, tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    await dpsup.start(2, form=Form.CLI, admin_socket=str(sock), min_ready=1)
    code, out, err = await ctl(sock, "--progress", "rolling-restart")
    assert (code, out) == (0, "restarted ranks 0, 1, at most 1 out at a time\n"), err
    assert err.splitlines() == [
        "trio-dpsup ctl: rank 0: draining and restarting (1 of 2)",
        "trio-dpsup ctl: rank 0 ready again",
        "trio-dpsup ctl: rank 1: draining and restarting (2 of 2)",
        "trio-dpsup ctl: rank 1 ready again",
    ]
    # Without --progress (and with stderr not a terminal), nothing but the answer.
    code, out, err = await ctl(sock, "rolling-restart")
    assert (code, err) == (0, "")


async def test_sigterm_drains_every_serving_rank_at_once(dpsup: Harness) -> None:
    deployment = await dpsup.start(
        3, form=Form.CLI, inflight_metrics=(BUSY,), drain_delay=0.5, drain_timeout=20.0
    )
    await deployment.make_busy(2, requests=1)
    deployment.signal_supervisor(signal.SIGTERM)
    status = await deployment.wait_for_status(
        lambda s: all(r.drain is not None for r in s.ranks), "every rank draining"
    )
    assert status.state is SupervisorState.DRAINING
    assert not any(status.takes_traffic(r) for r in status.ranks)
    # Ranks 0 and 1 are idle: drained after the delay; rank 2 waits for its request.
    status = await deployment.wait_for_status(
        lambda s: all(r.drain is not None and r.drain.end for r in s.ranks[:2]),
        "ranks 0 and 1 drained",
    )
    drain = status.ranks[2].drain
    assert drain is not None
    assert drain.end is None
    assert drain.inflight == 1
    assert all(r.pid is not None and alive(r.pid) for r in status.ranks), "nothing signalled yet"
    await deployment.make_busy(2, requests=0)
    assert await deployment.wait_exit() == 0
    final = await deployment.final_status()
    assert [r.drain.end if r.drain else None for r in final.ranks] == [DrainEnd.EMPTY] * 3


async def test_a_rolling_restart_counts_a_drained_rank_as_out(
    dpsup: Harness, tmp_path: Path
) -> None:
    # One of 3 drained and --min-ready 2: restarting any other rank would leave 1 serving.
    sock = tmp_path / "admin.sock"
    deployment = await dpsup.start(3, form=Form.CLI, admin_socket=str(sock), min_ready=2)
    assert (await ctl(sock, "drain", "1"))[0] == 0
    code, out, err = await ctl(sock, "rolling-restart")
    assert (code, out) == (2, "")
    assert "drained rank(s) 1 already count against --max-unavailable 1" in err
    assert [r.restarts for r in (await deployment.status()).ranks] == [0, 0, 0]
    # With room for it, the drained rank is skipped and left drained.
    code, out, err = await ctl(sock, "rolling-restart", "--max-unavailable", "2")
    assert (code, err) == (0, "")
    assert out == (
        "restarted ranks 0, 2, at most 2 out at a time; skipped rank 1: it is drained: left "
        "drained\n"
    )
    status = await deployment.status()
    assert [r.restarts for r in status.ranks] == [1, 0, 1]
    assert status.ranks[1].drained


async def test_sigterm_during_a_restart_drain_stops_the_rank_without_restarting_it(
    dpsup: Harness, tmp_path: Path
) -> None:
    sock = tmp_path / "admin.sock"
    deployment = await dpsup.start(
        2, form=Form.CLI, admin_socket=str(sock), min_ready=1, inflight_metrics=(BUSY,)
    )
    await deployment.make_busy(1, requests=1)
    assert (await ctl(sock, "restart", "1"))[0] == 0
    await deployment.wait_for_status(
        lambda s: s.ranks[1].drain is not None and s.ranks[1].drain.inflight == 1,
        "rank 1 draining for its restart",
    )
    # It comes back by itself: an undrain now would put it in the routers mid-restart.
    code, _, err = await ctl(sock, "undrain", "1")
    assert code == 2
    assert "rank 1 is being drained for a restart: it comes back by itself" in err
    deployment.signal_supervisor(signal.SIGTERM)
    status = await deployment.wait_for_status(
        lambda s: s.state is SupervisorState.DRAINING and s.ranks[0].drain is not None,
        "the shutdown's drain",
    )
    assert status.ranks[1].pid is not None
    assert alive(status.ranks[1].pid), "its requests in flight are still awaited"
    await deployment.make_busy(1, requests=0)
    assert await deployment.wait_exit() == 0
    final = await deployment.final_status()
    assert final.ranks[1].restarts == 0, "a shutdown does not restart a rank it drained"


async def test_a_second_signal_skips_what_is_left_of_every_drain(dpsup: Harness) -> None:
    deployment = await dpsup.start(
        2, form=Form.CLI, inflight_metrics=(BUSY,), drain_timeout=60.0, grace_period=20.0
    )
    await deployment.make_busy(0, requests=1)
    await deployment.make_busy(1, requests=1)
    deployment.signal_supervisor(signal.SIGTERM)
    await deployment.wait_for_status(
        lambda s: all(r.drain is not None and r.drain.inflight == 1 for r in s.ranks),
        "both ranks draining, a request in flight each",
    )
    start = trio.current_time()
    await deployment.signal_supervisor_again(signal.SIGTERM)
    with trio.fail_after(15):
        code = await deployment.wait_exit()
    assert trio.current_time() - start < 10.0, "not the drain timeout (60 s) nor the grace (20 s)"
    final = await deployment.final_status()
    assert [r.drain.end if r.drain else None for r in final.ranks] == [DrainEnd.SKIPPED] * 2
    assert code == 1  # what a second signal means: kill now, which is no clean stop
