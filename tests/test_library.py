"""The library form: ``await nursery.start(Supervisor(config).run)`` inside a Trio program."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from typing import Unpack

import httpx
import pytest
import trio

from trio_dpsup import (
    ConfigError,
    Preset,
    RankExited,
    RankState,
    RestartPolicy,
    RestartScope,
    StartupTimeout,
    Supervisor,
    SupervisorConfig,
    SupervisorHandle,
    SupervisorState,
    SupervisorStopped,
)
from trio_dpsup.testing import (
    FAKE_RANK,
    Harness,
    SupervisorSettings,
    alive,
    free_port_range,
    wait_pids_gone,
)

pytest_plugins = ["trio_dpsup.testing.plugin"]


def fake_config(
    ranks: int, base_port: int, /, *rank_args: str, **fields: Unpack[SupervisorSettings]
) -> SupervisorConfig:
    settings: SupervisorSettings = {
        "gpus_per_rank": 0,
        "base_port": base_port,
        "control_port": 0,
        "probe_interval": 0.1,
        "probe_timeout": 0.5,
        "failure_threshold": 2,
        "grace_period": 5.0,
        **fields,
    }
    command = (*FAKE_RANK, "--port", "{port}", *rank_args)
    return SupervisorConfig(command=command, ranks=ranks, **settings)


async def start_and_wait_ready(config: SupervisorConfig) -> None:
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(Supervisor(config).run)
        await handle.wait_ready()


async def test_start_wait_ready_and_request_shutdown() -> None:
    base = free_port_range(2)
    async with trio.open_nursery() as nursery:
        handle: SupervisorHandle = await nursery.start(Supervisor(fake_config(2, base)).run)
        await handle.wait_ready()
        status = handle.status()
        assert status.state is SupervisorState.READY
        assert [r.state for r in status.ranks] == [RankState.READY] * 2
        pids = [r.pid for r in status.ranks if r.pid is not None]
        assert len(pids) == 2
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{handle.control_url}/ready")).status_code == 200

        handle.request_shutdown()
        assert await handle.wait_stopped() == 0
    assert handle.status().state is SupervisorState.STOPPED
    assert [r.state for r in handle.status().ranks] == [RankState.STOPPED] * 2
    assert await wait_pids_gone(pids, 5.0) == []


async def test_a_rank_crash_surfaces_as_rank_exited() -> None:
    base = free_port_range(2)
    pids: list[int] = []
    with pytest.RaisesGroup(pytest.RaisesExc(RankExited, match="rank 1 exited unexpectedly")):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(Supervisor(fake_config(2, base)).run)
            await handle.wait_ready()
            pids = [r.pid for r in handle.status().ranks if r.pid is not None]
            os.kill(pids[1], signal.SIGKILL)
            await trio.sleep_forever()  # ended by the supervisor's failure
    assert handle.exit_status == 128 + signal.SIGKILL
    assert await wait_pids_gone(pids, 5.0) == []


async def test_wait_ready_raises_the_startup_failure() -> None:
    base = free_port_range(1)
    config = fake_config(1, base, "--ready-after", "600", startup_timeout=0.5)
    # wait_ready raises at once; run() may or may not raise the timeout itself before the
    # nursery's cancellation reaches it. Either way the cause is the timeout.
    with pytest.raises(BaseExceptionGroup) as info:
        await start_and_wait_ready(config)
    stopped, rest = info.value.split(SupervisorStopped)
    assert stopped is not None
    assert rest is None or rest.split(StartupTimeout)[1] is None
    (error,) = stopped.exceptions
    assert isinstance(error, SupervisorStopped)
    assert isinstance(error.failure, StartupTimeout)
    assert error.failure.not_ready == (0,)


async def test_taken_control_port_is_a_config_error_with_nothing_started(tmp_path: Path) -> None:
    base = free_port_range(1)
    pid_file = tmp_path / "pids"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = fake_config(1, base, "--pid-file", str(pid_file), control_port=port)
        async with trio.open_nursery() as nursery:
            with pytest.raises(ConfigError, match=f"--control-port {port}"):
                await nursery.start(Supervisor(config).run)
    assert not pid_file.exists()  # no rank was started


async def test_outer_cancellation_stops_every_rank() -> None:
    base = free_port_range(2)
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(Supervisor(fake_config(2, base)).run)
        await handle.wait_ready()
        pids = [r.pid for r in handle.status().ranks if r.pid is not None]
        nursery.cancel_scope.cancel()
    assert handle.status().state is SupervisorState.STOPPED
    assert await wait_pids_gone(pids, 5.0) == []


async def test_prober_transport_is_injected() -> None:
    # Ranks that serve no HTTP at all, judged healthy by an injected transport.
    seen: list[str] = []

    def healthy(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200)

    config = SupervisorConfig(
        gpus_per_rank=0,
        command=(sys.executable, "-c", "import time; time.sleep(600)"),
        ranks=2,
        base_port=free_port_range(2),
        control_port=0,
    )
    supervisor = Supervisor(config, transport=httpx.MockTransport(healthy))
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(supervisor.run)
        await handle.wait_ready()
        pids = [r.pid for r in handle.status().ranks if r.pid is not None]
        assert all(alive(pid) for pid in pids)
        handle.request_shutdown()
    assert f"http://127.0.0.1:{config.base_port + 1}/health" in seen
    assert handle.exit_status == 0


@pytest.mark.parametrize(
    ("field", "text", "member"),
    [
        ("restart", "never", RestartPolicy.NEVER),
        ("restart", "on-failure", RestartPolicy.ON_FAILURE),
        ("restart_scope", "all", RestartScope.ALL),
        ("preset", "vllm", Preset.VLLM),
    ],
)
def test_an_enum_setting_given_as_its_value_is_converted(
    field: str, text: str, member: object
) -> None:
    # As a caller without a type checker writes it: the text, not the enum.
    config = SupervisorConfig(command=("server",), **{field: text})  # type: ignore[arg-type]
    assert getattr(config, field) is member


@pytest.mark.parametrize(
    ("field", "allowed"),
    [
        ("restart", "never, on-failure, always"),
        ("restart_scope", "rank, all"),
        ("preset", "vllm, sglang, llama-cpp"),
    ],
)
def test_an_enum_setting_of_no_known_value_is_refused(field: str, allowed: str) -> None:
    with pytest.raises(ConfigError, match=f"must be one of {allowed}, not 'bogus'"):
        SupervisorConfig(command=("server",), **{field: "bogus"})  # type: ignore[arg-type]


async def test_restart_given_as_a_string_never_restarts(dpsup: Harness) -> None:
    # The CLI converts; so must the library: "never" must not be misread as a policy.
    deployment = await dpsup.start(2, restart="never")  # type: ignore[arg-type]
    await deployment.crash_rank(1, 3)
    assert await deployment.wait_exit() == 3
    await deployment.assert_no_leftovers()
