"""The operator socket and `trio-dpsup ctl`, against real supervisors."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import trio

from trio_dpsup import RankState, RestartRequested, SupervisorState
from trio_dpsup.testing import Deployment, Form, Harness

from .conftest import FORMS, on_failure

pytest_plugins = ["trio_dpsup.testing.plugin"]


async def ctl(socket_path: Path, *args: str) -> tuple[int, str, str]:
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_dpsup", "ctl", "--admin-socket", str(socket_path), *args],
            capture_stdout=True, capture_stderr=True, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def ready_again(deployment: Deployment, rank: int, restarts: int) -> None:
    with trio.fail_after(20):
        await deployment.wait_for_status(
            lambda s: s.ranks[rank].restarts == restarts and s.ranks[rank].state is RankState.READY,
            f"rank {rank} ready after {restarts} restart(s)",
        )


@FORMS
async def test_restart_one_rank_alone(dpsup: Harness, form: Form, tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    deployment = await dpsup.start(3, form=form, admin_socket=str(sock))
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
    assert (code, out.strip(), err) == (0, "restarted ranks 0, 1, 2, one at a time", "")
    assert len(codes) > 10
    assert set(codes) == {200}, f"/ready was not 200 throughout: {sorted(set(codes))}"
    status = await deployment.status()
    assert [r.restarts for r in status.ranks] == [1, 1, 1]
    deployment.signal_supervisor(15)
    assert await deployment.wait_exit() == 0
    await deployment.assert_no_leftovers()


async def test_drain_pause_and_the_metrics(dpsup: Harness, tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    deployment = await dpsup.start(2, admin_socket=str(sock), probe_interval=0.1)
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
        await deployment.fail_health(0, 500)
        await trio.sleep(0.5)  # the period under test: five probe intervals, none probed
        assert (await deployment.status()).state is SupervisorState.READY
        metrics = (await client.get("/metrics")).text
    for action in ("drain", "undrain", "pause-probes"):
        assert f'trio_dpsup_admin_actions_total{{action="{action}"}} 1.0' in metrics


async def test_errors_are_one_line_and_exit_2(dpsup: Harness, tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    deployment = await dpsup.start(
        2, admin_socket=str(sock), rank_args=["--stop-delay", "1"], **on_failure(0.1)
    )
    cases = [
        (("restart", "7"), "no rank 7 here: the ranks are 0-1"),
        (("rolling-restart",), "run the supervisor with --min-ready 1"),
        (("pause-probes", "0", "-1"), "pause-probes needs SECONDS between 0 and 86400"),
    ]
    for args, message in cases:
        code, out, err = await ctl(sock, *args)
        assert (code, out) == (2, "")
        assert err.startswith("trio-dpsup ctl: error: ")
        assert err.endswith(f"{message}\n")
        assert err.count("\n") == 1
    assert (await ctl(sock, "restart", "1"))[0] == 0  # it takes a second to stop
    code, _, err = await ctl(sock, "restart", "1")
    assert code == 2
    assert err == "trio-dpsup ctl: error: rank 1 is restarting: restart a ready rank\n"
    await ready_again(deployment, 1, 1)
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
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        's.sendall(b\'{"action": "status"}\\n\'); print(s.recv(65536).decode())\n'
    )
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-c", nobody, str(sock)], capture_stdout=True, check=False
        )
    assert result.stdout.decode().strip() == (
        '{"ok": false, "error": "uid 65534 is not the supervisor\'s owner (0)"}'
    )
    shutil.rmtree(reachable, ignore_errors=True)
