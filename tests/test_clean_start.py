"""Clean (re)starts: a restart waits for its port and for its previous process's GPU
memory, naming what holds them; foreign GPU memory is named, or refused on request."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Unpack

import pytest
import trio

from trio_dpsup import (
    ConfigError,
    GpuMemoryHeld,
    PortInUse,
    RankExited,
    RankState,
    Supervisor,
    SupervisorConfig,
)
from trio_dpsup.testing import (
    FAKE_RANK,
    Deployment,
    FakeNvml,
    Form,
    Harness,
    SupervisorSettings,
    free_port_range,
)

from .conftest import FORMS, on_failure

pytest_plugins = ["trio_dpsup.testing.plugin"]

#: Restart after a backoff long enough for a test to take the port meanwhile.
SLOW_RESTART = on_failure(0.5)


async def restarting(deployment: Deployment, rank: int) -> None:
    with trio.fail_after(10):
        await deployment.wait_for_rank_state(rank, RankState.RESTARTING)


async def waiting_for(deployment: Deployment, rank: int, text: str) -> str:
    """Wait until the rank's /status entry says it waits for `text`; return what it says."""
    with trio.fail_after(10):
        status = await deployment.wait_for_status(
            lambda s: text in (s.ranks[rank].waiting or ""), f"rank {rank} waiting for {text}"
        )
    waiting = status.ranks[rank].waiting
    assert waiting is not None
    return waiting


def listen_on(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@FORMS
async def test_a_restart_waits_for_its_port_and_names_the_holder(
    dpsup: Harness, form: Form
) -> None:
    deployment = await dpsup.start(2, form=form, **SLOW_RESTART)
    await deployment.crash_rank(1, 3)
    await restarting(deployment, 1)
    # The old process is gone (its port free): a stranger takes the port before the restart.
    with listen_on(deployment.ports[1]):
        waiting = await waiting_for(deployment, 1, f"port {deployment.ports[1]} held by")
        assert f"pid {os.getpid()} (" in waiting
        assert waiting.endswith("; not ours)")
        status = await deployment.status()
        assert status.ranks[1].state is RankState.RESTARTING
        assert await deployment.ready_code(rank=0) == 200  # the other rank serves on
    # Released: the restart goes on, on the same port.
    with trio.fail_after(10):
        after = await deployment.wait_for_status(
            lambda s: s.ranks[1].restarts == 1 and s.ranks[1].state is RankState.READY,
            "rank 1 ready again",
        )
    assert after.ranks[1].waiting is None
    assert after.ranks[1].port == deployment.ports[1]


async def test_a_port_still_held_after_port_wait_stops_everything(dpsup: Harness) -> None:
    deployment = await dpsup.start(1, **on_failure(0.5, port_wait=0.3))
    await deployment.crash_rank(0, 3)
    await restarting(deployment, 0)
    with listen_on(deployment.ports[0]):
        with trio.fail_after(10):
            assert await deployment.wait_exit() == 1
    failure = await deployment.failure()
    assert isinstance(failure, PortInUse)
    assert (failure.rank, failure.port) == (0, deployment.ports[0])
    assert failure.waited >= 0.3
    (holder,) = failure.holders
    assert holder.pid == os.getpid()
    assert f"pid {os.getpid()} (" in str(failure)


async def crash_with_lingering_memory(
    dpsup: Harness, **settings: Unpack[SupervisorSettings]
) -> tuple[Deployment, FakeNvml, int]:
    """One GPU rank whose 4 GiB outlive its process, as vLLM's engine's do until the driver
    frees them; crashed. Returns the deployment, the fake NVML and the old pid."""
    fake = FakeNvml(gpus=1)
    on_gpu: SupervisorSettings = {"gpus_per_rank": 1, **settings}
    deployment = await dpsup.start(1, nvml=fake.factory, **on_failure(0.5, **on_gpu))
    old = await deployment.rank_pid(0)
    fake.place(old, fake.gpus[0].uuid, used_mib=4096, linger=True)
    await deployment.crash_rank(0, 3)
    return deployment, fake, old


async def test_a_restart_waits_for_the_previous_gpu_memory(dpsup: Harness) -> None:
    deployment, fake, old = await crash_with_lingering_memory(dpsup, gpu_interval=0.1)
    waiting = await waiting_for(deployment, 0, "GPU memory of the previous process")
    assert f"pid {old} (" in waiting
    assert "holds 4096 MiB on GPU 0" in waiting
    assert (await deployment.status()).ranks[0].pid == old  # not restarted yet
    fake.remove(old)  # released
    with trio.fail_after(10):
        after = await deployment.wait_for_status(
            lambda s: s.ranks[0].restarts == 1 and s.ranks[0].state is RankState.READY,
            "rank 0 ready again",
        )
    assert after.ranks[0].pid != old
    (cause,) = after.ranks[0].last_causes
    assert isinstance(cause, RankExited)


async def test_gpu_memory_never_released_stops_everything(dpsup: Harness) -> None:
    deployment, _, old = await crash_with_lingering_memory(dpsup, gpu_release_wait=0.3)
    with trio.fail_after(10):
        assert await deployment.wait_exit() == 1
    failure = await deployment.failure()
    assert isinstance(failure, GpuMemoryHeld)
    assert not failure.foreign
    assert [(h.pid, h.memory_mib) for h in failure.holders] == [(old, 4096)]
    assert "its previous process's GPU memory was still held after" in str(failure)


@pytest.fixture
def stranger() -> Iterator[int]:
    """A process outside every supervised tree, to hold GPU memory in a fake NVML."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


async def test_foreign_gpu_memory_is_named_or_refused(stranger: int) -> None:
    fake = FakeNvml(gpus=1)
    fake.place(stranger, fake.gpus[0].uuid, used_mib=2048)
    config = SupervisorConfig(
        command=(*FAKE_RANK, "--port", "{port}"),
        ranks=1,
        base_port=free_port_range(1),
        control_port=0,
        require_clean_gpus=True,
    )
    with pytest.raises(ConfigError) as raised:
        await Supervisor(config, nvml=fake.factory).run()
    message = str(raised.value)
    assert f"rank 0's GPUs are not free: pid {stranger} (python" in message
    assert "holds 2048 MiB on GPU 0" in message
    assert "stop those processes, or drop --require-clean-gpus" in message
