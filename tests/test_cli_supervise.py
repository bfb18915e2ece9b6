"""The CLI end to end, as a user runs it: real ranks, real HTTP on loopback, real signals.

The faults, in both forms, are in test_fault_matrix.py.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import psutil

from trio_dpsup import SupervisorStatus
from trio_dpsup.testing import (
    Fault,
    alive,
    free_port_range,
    inject_fault,
    open_cli_supervisor,
    read_pid_file,
    wait_pids_gone,
)

from .conftest import cli_args


def rank_pids(status: SupervisorStatus) -> list[int]:
    return [rank.pid for rank in status.ranks if rank.pid is not None]


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
        pids = rank_pids(await sup.status())
        assert len(pids) == 4
        assert all(alive(pid) for pid in pids)

        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 0
        assert await wait_pids_gone(pids, 5.0) == []
        assert "stopped cleanly" in sup.log


async def test_crash_with_an_orphaned_grandchild_keeps_the_rank_exit_status(
    tmp_path: Path,
) -> None:
    base = free_port_range(2)
    rank_args = ["--pid-file", str(tmp_path / "pids-{rank}"), "--grandchild", "double-fork"]
    async with open_cli_supervisor(cli_args(2, base, rank_args=rank_args)) as sup:
        await sup.wait_ready()
        pids = [pid for r in (0, 1) for pid in read_pid_file(tmp_path / f"pids-{r}").values()]
        # The ranks are its children; the double-forked sleepers were adopted by it (it is
        # a child subreaper), not by init.
        assert len(pids) == 4
        assert all(psutil.Process(pid).ppid() == sup.pid for pid in pids)
        await inject_fault(base, Fault.exit(7))
        # Reaping the adopted orphan must never reap the rank and lose its status.
        assert await sup.wait() == 7
        assert "rank 0 exited unexpectedly: exit status 7" in sup.log
        assert await wait_pids_gone(pids, 5.0) == []


async def test_drain_delay_answers_503_while_ranks_still_serve() -> None:
    base = free_port_range(2)
    async with open_cli_supervisor(cli_args(2, base, options=["--drain-delay", "1"])) as sup:
        url = await sup.wait_ready()
        pids = rank_pids(await sup.status())
        sup.send_signal(signal.SIGTERM)
        await sup.wait_for_line("draining ranks 0, 1 before stopping them")
        async with httpx.AsyncClient(base_url=url) as client:
            ready = await client.get("/ready")
            assert (ready.status_code, ready.text) == (503, "draining\n")
            assert (await client.get("/ranks/0/ready")).status_code == 503
            assert (await client.get("/livez")).status_code == 200
        assert all(alive(pid) for pid in pids)
        assert await sup.wait() == 0
        assert await wait_pids_gone(pids, 5.0) == []
