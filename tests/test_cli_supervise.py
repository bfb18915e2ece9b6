"""The CLI end to end, as a user runs it: real ranks, real HTTP on loopback, real signals."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

from trio_dpsup.testing import (
    alive,
    free_port_range,
    open_cli_supervisor,
    read_pid_file,
    wait_pids_gone,
)

from .conftest import cli_args

#: How long ranks idle before the supervisor is SIGKILLed. Trio's idle worker threads exit
#: after 10 s; a rank whose parent-death signal was tied to one would die then.
IDLE_SECONDS = float(os.environ.get("TRIO_DPSUP_TEST_IDLE_SECONDS", "60"))


def rank_pids(status: dict[str, Any]) -> list[int]:
    return [int(rank["pid"]) for rank in status["ranks"]]


async def fault(port: int, action: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"http://127.0.0.1:{port}/fault/{action}")
        response.raise_for_status()


async def test_four_ranks_become_ready_and_stop_cleanly() -> None:
    base = free_port_range(4)
    async with open_cli_supervisor(cli_args(4, base)) as sup:
        url = await sup.wait_ready()
        async with httpx.AsyncClient(base_url=url) as client:
            for path in ("/ready", "/readyz", "/health", "/livez", "/startupz"):
                response = await client.get(path)
                assert (response.status_code, response.text) == (200, "ok\n"), path
            for rank in range(4):
                assert (await client.get(f"/ranks/{rank}/ready")).status_code == 200
            assert (await client.get("/ranks/4/ready")).status_code == 404
            assert (await client.get("/nowhere")).status_code == 404
            post = await client.post("/ready")
            assert (post.status_code, post.headers["allow"]) == (405, "GET, HEAD")
            head = await client.head("/ready")
            assert (head.status_code, head.content) == (200, b"")
            status = (await client.get("/status")).json()

        assert status["state"] == "ready"
        assert [r["state"] for r in status["ranks"]] == ["ready"] * 4
        assert [r["port"] for r in status["ranks"]] == [base + i for i in range(4)]
        pids = rank_pids(status)
        assert all(alive(pid) for pid in pids)

        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 0
        assert await wait_pids_gone(pids, 5.0) == []
        assert "stopped cleanly" in sup.log


async def test_sigkill_of_a_rank_stops_every_rank_with_137() -> None:
    base = free_port_range(3)
    # Ranks that take a second to stop keep the teardown open long enough to watch /ready.
    args = cli_args(3, base, rank_args=["--stop-delay", "1"])
    async with open_cli_supervisor(args) as sup:
        url = await sup.wait_ready()
        pids = rank_pids(await sup.status())
        os.kill(pids[1], signal.SIGKILL)
        await sup.wait_for_line("rank 1 exited unexpectedly: killed by SIGKILL")
        async with httpx.AsyncClient(base_url=url) as client:
            ready = await client.get("/ready")
            assert ready.status_code == 503
            assert "rank 1 exited unexpectedly: killed by SIGKILL" in ready.text
            assert (await client.get("/ranks/0/ready")).status_code == 503
        assert await sup.wait() == 137
        assert await wait_pids_gone(pids, 5.0) == []


async def test_sigterm_stops_grandchildren_of_every_kind(tmp_path: Path) -> None:
    base = free_port_range(1)
    pid_file = tmp_path / "pids"
    rank_args = ["--pid-file", str(pid_file)]
    for kind in ("group", "setsid", "double-fork"):
        rank_args += ["--grandchild", kind]
    async with open_cli_supervisor(cli_args(1, base, rank_args=rank_args)) as sup:
        await sup.wait_ready()
        pids = read_pid_file(pid_file)
        assert set(pids) == {
            "rank",
            "grandchild-group",
            "grandchild-setsid",
            "grandchild-double-fork",
        }
        assert all(alive(pid) for pid in pids.values())
        # The orphan was adopted by the supervisor (a child subreaper), not by init.
        assert psutil.Process(pids["grandchild-double-fork"]).ppid() == sup.pid

        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 0
        assert await wait_pids_gone(pids.values(), 5.0) == []


async def test_crash_with_an_orphaned_grandchild_keeps_the_rank_exit_status(
    tmp_path: Path,
) -> None:
    base = free_port_range(2)
    pid_file = tmp_path / "pids"
    rank_args = ["--pid-file", str(pid_file), "--grandchild", "double-fork"]
    async with open_cli_supervisor(cli_args(2, base, rank_args=rank_args)) as sup:
        await sup.wait_ready()
        pids = list(read_pid_file(pid_file).values())  # both ranks append to the same file
        await fault(base, "exit?code=7")
        # Reaping the adopted orphan must never reap the rank and lose its status.
        assert await sup.wait() == 7
        assert "rank 0 exited unexpectedly: exit status 7" in sup.log
        assert await wait_pids_gone(pids, 5.0) == []


async def test_rank_ignoring_sigterm_is_killed_at_the_grace_deadline() -> None:
    base = free_port_range(1)
    grace = 1.0
    args = cli_args(1, base, options=["--grace-period", str(grace)], rank_args=["--ignore-sigterm"])
    async with open_cli_supervisor(args) as sup:
        await sup.wait_ready()
        pids = rank_pids(await sup.status())
        start = trio.current_time()
        sup.send_signal(signal.SIGTERM)
        status = await sup.wait()
        elapsed = trio.current_time() - start
        # Exact figures come from bench/; here only that it waited, and did not hang.
        assert grace <= elapsed < grace + 2.0
        assert status == 1
        assert "rank 0 did not stop within the grace period" in sup.log
        assert await wait_pids_gone(pids, 5.0) == []


async def test_second_signal_skips_the_rest_of_the_grace_period() -> None:
    base = free_port_range(1)
    args = cli_args(1, base, options=["--grace-period", "120"], rank_args=["--ignore-sigterm"])
    async with open_cli_supervisor(args) as sup:
        await sup.wait_ready()
        pids = rank_pids(await sup.status())
        sup.send_signal(signal.SIGTERM)
        await sup.wait_for_line("shutdown requested")
        sup.send_signal(signal.SIGINT)
        assert await sup.wait(timeout=10.0) == 1
        assert "second signal (SIGINT): killing ranks now" in sup.log
        assert await wait_pids_gone(pids, 5.0) == []


async def test_drain_delay_answers_503_while_ranks_still_serve() -> None:
    base = free_port_range(2)
    async with open_cli_supervisor(cli_args(2, base, options=["--drain-delay", "1"])) as sup:
        url = await sup.wait_ready()
        pids = rank_pids(await sup.status())
        sup.send_signal(signal.SIGTERM)
        await sup.wait_for_line("draining for 1s")
        async with httpx.AsyncClient(base_url=url) as client:
            ready = await client.get("/ready")
            assert (ready.status_code, ready.text) == (503, "draining\n")
            assert (await client.get("/ranks/0/ready")).status_code == 503
            assert (await client.get("/livez")).status_code == 200
        assert all(alive(pid) for pid in pids)
        assert await sup.wait() == 0
        assert await wait_pids_gone(pids, 5.0) == []


async def test_supervisor_sigkilled_after_a_long_idle_takes_its_trees_along(
    tmp_path: Path,
) -> None:
    base = free_port_range(2)
    rank_args = ["--pid-file", str(tmp_path / "pids-{rank}")]
    rank_args += ["--grandchild", "setsid", "--grandchild", "double-fork"]
    async with open_cli_supervisor(cli_args(2, base, rank_args=rank_args)) as sup:
        await sup.wait_ready()
        pids = [pid for rank in (0, 1) for pid in read_pid_file(tmp_path / f"pids-{rank}").values()]
        assert set(rank_pids(await sup.status())) <= set(pids)
        assert len(pids) == 6
        await trio.sleep(IDLE_SECONDS)  # the idle period under test, not synchronisation
        assert all(alive(pid) for pid in pids), "a process died while idle"
        sup.send_signal(signal.SIGKILL)
        await sup.wait()
        # Ranks by their parent-death signal, their grandchildren by the guardian.
        assert await wait_pids_gone(pids, 2.0) == []


async def test_exit_status_zero_without_a_request_is_a_failure() -> None:
    base = free_port_range(2)
    async with open_cli_supervisor(cli_args(2, base)) as sup:
        await sup.wait_ready()
        await fault(base + 1, "exit?code=0")
        assert await sup.wait() == 1
        assert "rank 1 exited unexpectedly: exit status 0" in sup.log


async def test_rank_answering_503_fails_after_the_threshold() -> None:
    base = free_port_range(2)
    async with open_cli_supervisor(cli_args(2, base)) as sup:
        await sup.wait_ready()
        pids = rank_pids(await sup.status())
        await fault(base, "health?status=503")
        assert await sup.wait() == 1
        assert "rank 0 is unhealthy: 2 consecutive probe failures, last: HTTP 503" in sup.log
        assert await wait_pids_gone(pids, 5.0) == []


async def test_rank_whose_health_hangs_fails_by_probe_timeout() -> None:
    base = free_port_range(1)
    async with open_cli_supervisor(cli_args(1, base)) as sup:
        await sup.wait_ready()
        await fault(base, "hang")
        assert await sup.wait() == 1
        assert "rank 0 is unhealthy: 2 consecutive probe failures, last: no answer" in sup.log


async def test_startup_timeout_names_the_ranks_not_ready() -> None:
    base = free_port_range(2)
    args = cli_args(2, base, options=["--startup-timeout", "1"], rank_args=["--ready-after", "600"])
    async with open_cli_supervisor(args) as sup:
        url = await sup.control_url()
        async with httpx.AsyncClient(base_url=url) as client:
            startupz = await client.get("/startupz")
            assert startupz.status_code == 503
            assert "ranks not ready" in startupz.text
        assert await sup.wait() == 1
        assert "startup timed out after 1s; ranks not ready: 0, 1" in sup.log
