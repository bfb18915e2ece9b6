"""Startup by progress: a load that moves (reads, output lines) becomes ready however long it
takes within the deadline; a wedged load (a spinning CPU, nothing else) fails within
--startup-stall-timeout, long before the deadline; /startupz and /status say what moved."""

from __future__ import annotations

import re
import time

import httpx
import pytest
import trio

from trio_dpsup import (
    ConfigError,
    RankState,
    StartupStalled,
    SupervisorConfig,
    SupervisorState,
)

# The pure part of the check (what counts as a move), on purpose.
from trio_dpsup._ranks.startup import StartupWatch
from trio_dpsup.testing import FakeNvml, Form, Harness, run_cli

from .conftest import FORMS, cli_args

pytest_plugins = ["trio_dpsup.testing.plugin"]

STALL = 2.0


def test_only_reads_gpu_memory_and_lines_are_moves() -> None:
    watch = StartupWatch(started=0.0)
    assert watch.observe(1.0, {10: 100}, None, 0) == 0.0  # its first reads
    assert watch.last_moved == "bytes read"
    assert watch.observe(2.0, {10: 100}, None, 0) == 1.0  # nothing new
    assert watch.observe(3.0, {}, None, 0) == 2.0  # a process gone is no move back
    assert watch.observe(4.0, {11: 5}, 1000, 0) == 0.0  # a new process that read
    assert watch.observe(5.0, {11: 5}, 2000, 0) == 0.0
    assert watch.last_moved == "GPU memory"
    assert watch.observe(6.0, {11: 5}, 1500, 0) == 1.0  # memory given back is no move
    assert watch.observe(7.0, {11: 5}, 1500, 3) == 0.0
    assert watch.last_moved == "output lines"
    assert watch.observe(9.5, {11: 5}, 1500, 3) == 2.5


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"startup_stall_timeout": -1.0}, "--startup-stall-timeout must be 0 or more seconds"),
        (
            {"startup_stall_timeout": 60.0, "startup_timeout": 30.0},
            "--startup-stall-timeout 60 is not below --startup-timeout 30",
        ),
    ],
)
def test_bad_stall_timeouts_name_the_fix(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SupervisorConfig(command=("server",), **settings)  # type: ignore[arg-type]


async def test_a_stall_timeout_that_could_never_fire_exits_2() -> None:
    options = ["--startup-stall-timeout", "90", "--startup-timeout", "60"]
    status, _, stderr = await run_cli(cli_args(1, 1, options=options))
    assert status == 2
    assert "so it could never fire: lower it" in stderr


#: What two suites at once on 2 cores add to a start (the interpreter's own reads).
LOADED = 2.0


@FORMS
async def test_a_wedged_load_fails_within_the_stall_timeout(dpsup: Harness, form: Form) -> None:
    deployment = await dpsup.start(
        1, form=form, rank_args=["--load-wedge"], wait_ready=False,
        startup_stall_timeout=STALL, startup_timeout=60.0,
    )  # fmt: skip
    with trio.fail_after(10):
        starting = await deployment.wait_for_status(
            lambda s: s.ranks[0].state is RankState.STARTING and s.ranks[0].startup is not None,
            "rank 0 starting, watched",
        )
    spawned = starting.ranks[0].since  # wall clock: when the process was started
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        startupz = await client.get(f"{deployment.control_url}/startupz")
    assert startupz.status_code == 503
    # Nothing yet, or the interpreter's own start (it reads its modules: bytes read).
    assert re.search(r"rank 0: (nothing moved for|bytes read moved) [\d.]+s", startupz.text)
    with trio.fail_after(20):
        await deployment.wait_for_status(
            lambda s: s.ranks[0].failing or s.failure is not None, "rank 0 caught"
        )
    took = time.time() - spawned
    # The bound: the stall timeout + 1 s, from the process's start (measured quiet:
    # 2.03-2.06 s); a loaded machine starts the interpreter later, and its reads are moves.
    assert took <= STALL + 1.0 + LOADED, f"caught {took:.2f}s after the start"
    with trio.fail_after(20):
        assert await deployment.wait_exit() == 1
    failure = await deployment.failure()
    assert isinstance(failure, StartupStalled)
    assert failure.rank == 0
    assert STALL <= failure.seconds < STALL + 1.0
    assert "startup stalled: nothing moved toward ready" in str(failure)
    await deployment.assert_no_leftovers()


@FORMS
async def test_a_load_three_times_as_long_that_moves_becomes_ready(
    dpsup: Harness, form: Form
) -> None:
    began = time.time()
    deployment = await dpsup.start(
        1, form=form, rank_args=["--load-seconds", str(3 * STALL)], wait_ready=False,
        startup_stall_timeout=STALL, startup_timeout=60.0,
    )  # fmt: skip
    with trio.fail_after(10):
        moving = await deployment.wait_for_status(
            lambda s: (p := s.ranks[0].startup) is not None and p.last_moved is not None,
            "a move seen",
        )
    startup = moving.ranks[0].startup
    assert startup is not None
    assert startup.last_moved is not None
    assert "output lines" in startup.last_moved or "bytes read" in startup.last_moved
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        startupz = await client.get(f"{deployment.control_url}/startupz")
    assert startupz.status_code == 503
    assert "rank 0: " in startupz.text
    assert " moved " in startupz.text
    with trio.fail_after(30):
        status = await deployment.wait_ready()
    assert status.state is SupervisorState.READY
    assert status.failure is None
    assert time.time() - began >= 3 * STALL  # it did take three stall timeouts
    document = await deployment.status_document()
    assert document["ranks"][0]["startup"]["lines"] > 0


async def test_gpu_memory_growth_is_progress(dpsup: Harness) -> None:
    # A load that reads nothing and says nothing, but fills its GPU (as NVML reports):
    # it moves while the memory grows, and is caught once it stops.
    fake = FakeNvml(gpus=1)
    deployment = await dpsup.start(
        1, nvml=fake.factory, gpus_per_rank=1, gpu_interval=0.1, rank_args=["--load-wedge"],
        wait_ready=False, startup_stall_timeout=STALL, startup_timeout=60.0,
    )  # fmt: skip
    pid = await deployment.rank_pid(0)
    uuid = fake.gpus[0].uuid
    for step in range(8):  # 4 s of growth: twice the stall timeout
        fake.place(pid, uuid, used_mib=1024 * (step + 1))
        await trio.sleep(0.5)  # the simulated load's pace
        status = await deployment.status()
        assert status.ranks[0].state is RankState.STARTING
        assert not status.ranks[0].failing
    startup = status.ranks[0].startup
    assert startup is not None
    assert startup.last_moved == "GPU memory"
    stopped = trio.current_time()
    with trio.fail_after(20):
        await deployment.wait_for_status(
            lambda s: s.ranks[0].failing or s.failure is not None, "rank 0 caught"
        )
    assert trio.current_time() - stopped <= STALL + 1.0
    with trio.fail_after(20):
        assert await deployment.wait_exit() == 1
    failure = await deployment.failure()
    assert isinstance(failure, StartupStalled)
    assert "last moved: GPU memory" in str(failure)
