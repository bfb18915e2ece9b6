"""Serving through a pull-based balancer: HAProxy (Debian's) with the shipped configuration
(deploy/haproxy/haproxy.cfg), whose health checks ask the supervisor about each rank, in
front of llama-server ranks under a closed-loop load of 4 clients. Skips with one line where
haproxy, or the engine, is not installed."""

from __future__ import annotations

import re
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from trio_dpsup import Preset, RestartPolicy
from trio_dpsup.testing import Deployment, Form, Harness, free_port_range, open_load

from .conftest import llama
from .test_admin import ctl
from .test_router import exits

pytest_plugins = ["trio_dpsup.testing.plugin"]

CONFIG = Path(__file__).parent.parent / "deploy" / "haproxy" / "haproxy.cfg"


def configured(base: int, control: int, front: int) -> str:
    """The shipped configuration, its default ports replaced by the test's."""
    text = CONFIG.read_text()
    text = text.replace("bind 127.0.0.1:8080", f"bind 127.0.0.1:{front}")
    text = text.replace("addr 127.0.0.1 port 9000", f"addr 127.0.0.1 port {control}")
    text = re.sub(r"server (\d+) 127\.0\.0\.1:8\d\d\d", lambda m: f"server {m[1]} 127.0.0.1:"
                  f"{base + int(m[1])}", text)  # fmt: skip
    return text


@pytest.fixture
def haproxy() -> str:
    program = shutil.which("haproxy")
    if program is None:
        pytest.skip("haproxy is not installed (apt install haproxy)")
    return program


async def served_by_every_rank(deployment: Deployment) -> None:
    """Until each rank's own counters show requests: the balancer sends to all of them."""
    ports = [r.port for r in (await deployment.status()).ranks]
    async with httpx.AsyncClient(trust_env=False) as client:
        with trio.fail_after(20):
            for port in ports:
                while True:
                    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                    if not re.search(r"^llamacpp:prompt_tokens_total 0$", text, re.M):
                        break
                    await trio.sleep(0.1)


@pytest.fixture
async def behind_haproxy(
    dpsup: Harness, haproxy: str, llama_server: Path, tiny_model: Path, tmp_path: Path
) -> AsyncIterator[tuple[Deployment, str]]:
    base, control, front = free_port_range(2), free_port_range(1), free_port_range(1)
    config = tmp_path / "haproxy.cfg"
    config.write_text(configured(base, control, front))
    deployment = await dpsup.start(
        2, command=llama(llama_server, tiny_model, "-np", "2"), form=Form.CLI,
        preset=Preset.LLAMA_CPP, base_port=base, control_port=control, drain_delay=2.0,
        admin_socket=str(tmp_path / "admin.sock"), restart=RestartPolicy.ON_FAILURE,
        restart_backoff_min=0.1, restart_backoff_max=0.1, min_ready=1,
        # Real engines on a loaded machine: patient probes (these tests are about drains).
        probe_interval=0.5, probe_timeout=2.0, failure_threshold=3,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        process = await nursery.start(trio.run_process, [haproxy, "-f", str(config)])
        with trio.fail_after(10):
            while True:  # until it listens: it binds once it has read its configuration
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", front)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
        try:
            yield deployment, f"http://127.0.0.1:{front}"
        finally:
            process.send_signal(signal.SIGUSR1)  # a soft stop
            with trio.move_on_after(10):
                await process.wait()
            process.kill()


async def test_a_rolling_restart_restart_and_drain_through_haproxy_lose_nothing(
    behind_haproxy: tuple[Deployment, str], tmp_path: Path
) -> None:
    deployment, url = behind_haproxy
    sock = tmp_path / "admin.sock"
    async with open_load(url, clients=4) as load:
        await load.settle(4)
        await served_by_every_rank(deployment)
        with load.window("rolling restart"):
            code, out, err = await ctl(sock, "rolling-restart")
        await load.settle(len(load.succeeded()) + 8)
        with load.window("restart"):
            restarted = await ctl(sock, "restart", "1", "--wait")
        await load.settle(len(load.succeeded()) + 8)
        with load.window("drain"):
            drained = await ctl(sock, "drain", "0")
            await load.settle(len(load.succeeded()) + 8)
            undrained = await ctl(sock, "undrain", "0")
        await load.settle(len(load.succeeded()) + 8)
    assert (code, err) == (0, ""), out
    assert [restarted[0], drained[0], undrained[0]] == [0, 0, 0], (restarted, drained)
    assert load.failed() == [], load.summary()
    assert len(load.succeeded("rolling restart")) >= 4, load.summary()
    log = deployment.cli.log  # type: ignore[attr-defined]
    assert "did not stop within the grace period" not in log
    deployment.signal_supervisor(signal.SIGTERM)
    await exits(deployment)


async def test_sigterm_through_haproxy_answers_every_request_sent_before_it(
    behind_haproxy: tuple[Deployment, str],
) -> None:
    deployment, url = behind_haproxy
    async with open_load(url, clients=4, max_tokens=64) as load:
        await load.settle(4)
        await served_by_every_rank(deployment)
        signalled = trio.current_time()
        deployment.signal_supervisor(signal.SIGTERM)
        await exits(deployment)
    before = [r for r in load.requests if r.sent is not None and r.sent < signalled]
    assert [r for r in before if not r.ok] == [], load.summary()
    assert "did not stop within the grace period" not in deployment.cli.log  # type: ignore[attr-defined]
