"""Serving through a real router: sgl-router (``sglang-router`` from PyPI, the Rust router
SGLang users run) in front of llama-server ranks, fed by ``--router``, under a closed-loop
load of 4 clients (trio_dpsup.testing.open_load). What users feel is what is asserted:
requests that succeed while ranks are drained, restarted, stopped or crash. Skips with one
line where the router or the engine cannot be had."""

from __future__ import annotations

import importlib.util
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Unpack

import httpx
import pytest
import trio

from trio_dpsup import Preset, RestartPolicy
from trio_dpsup.testing import (
    Deployment,
    Form,
    Harness,
    SupervisorSettings,
    free_port_range,
    open_load,
)

from .conftest import llama
from .test_admin import ctl

pytest_plugins = ["trio_dpsup.testing.plugin"]


@pytest.fixture
async def router() -> AsyncIterator[str]:
    """An sgl-router with no workers on a free loopback port; its URL."""
    if importlib.util.find_spec("sglang_router") is None:
        pytest.skip("no sglang-router: pip install -e '.[test]'")
    port, metrics = free_port_range(1), free_port_range(1)
    url = f"http://127.0.0.1:{port}"
    argv = [
        sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
        "--port", str(port), "--prometheus-host", "127.0.0.1", "--prometheus-port",
        str(metrics), "--policy", "round_robin", "--health-check-interval-secs", "1",
        "--log-level", "warn",
    ]  # fmt: skip
    async with trio.open_nursery() as nursery:
        process = await nursery.start(trio.run_process, argv)
        async with httpx.AsyncClient(trust_env=False, timeout=2) as client:
            with trio.fail_after(60):
                while True:  # until it answers: a Rust binary starts in well under a second
                    try:
                        if (await client.get(f"{url}/workers")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.1)
        try:
            yield url
        finally:
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            process.kill()


async def router_lists(url: str) -> set[str]:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        response = await client.get(f"{url}/workers")
    return {w["url"] for w in response.json()["workers"]}


async def until_router(url: str, holds: Callable[[set[str]], bool], timeout: float = 10) -> None:  # noqa: ASYNC109
    """Read the router's list until `holds` says yes of it (the router has no event to wait
    on: its list is its only word), at most `timeout` seconds."""
    with trio.fail_after(timeout):
        while not holds(await router_lists(url)):  # noqa: ASYNC110
            await trio.sleep(0.05)


async def start(
    dpsup: Harness,
    ranks: int,
    llama_server: Path,
    tiny_model: Path,
    router: str,
    tmp_path: Path,
    **settings: Unpack[SupervisorSettings],
) -> Deployment:
    given: SupervisorSettings = {
        "preset": Preset.LLAMA_CPP,
        "routers": (f"sglang={router}",),
        "admin_socket": str(tmp_path / "admin.sock"),
        "restart": RestartPolicy.ON_FAILURE,
        "restart_backoff_min": 0.1,
        "restart_backoff_max": 0.1,
        "min_ready": 1,
        "grace_period": 20.0,
        # Real engines on a loaded machine (two whole suites at once): these tests are about
        # drains, not how fast a failure is seen, so the probes are patient.
        "probe_interval": 0.5,
        "probe_timeout": 2.0,
        "failure_threshold": 3,
        **settings,
    }
    # -np 2: two requests at once per rank, so that 4 clients keep both ranks busy.
    command = llama(llama_server, tiny_model, "-np", "2")
    deployment = await dpsup.start(ranks, command=command, form=Form.CLI, **given)
    ports = {f"http://127.0.0.1:{r.port}" for r in (await deployment.status()).ranks}
    await until_router(router, lambda listed: listed == ports)  # registered once ready
    return deployment


def log_of(deployment: Deployment) -> str:
    return deployment.cli.log  # type: ignore[attr-defined,no-any-return]


async def exits(deployment: Deployment, code: int = 0) -> None:
    """Assert the supervisor's exit status, with its log when it is not the one expected."""
    with trio.fail_after(60):
        got = await deployment.wait_exit()
    assert got == code, log_of(deployment)[-6000:]


async def test_ranks_are_registered_and_a_rolling_restart_loses_nothing(
    dpsup: Harness, llama_server: Path, tiny_model: Path, router: str, tmp_path: Path
) -> None:
    deployment = await start(dpsup, 2, llama_server, tiny_model, router, tmp_path)
    sock = tmp_path / "admin.sock"
    async with open_load(router, clients=4) as load:
        await load.settle(8)
        with load.window("rolling restart"):
            code, out, err = await ctl(sock, "rolling-restart", "--max-unavailable", "1")
        with load.window("after"):
            await load.settle(len(load.succeeded()) + 8)
    assert (code, err) == (0, ""), out
    assert load.failed() == [], load.summary()
    assert len(load.succeeded("rolling restart")) >= 4, load.summary()
    log = log_of(deployment)
    assert "did not stop within the grace period" not in log
    assert log.count("drained in") == 2, log
    status = await deployment.status()
    assert [r.restarts for r in status.ranks] == [1, 1]
    deployment.signal_supervisor(signal.SIGTERM)
    await exits(deployment)
    assert await router_lists(router) == set(), "every rank is taken out at exit"


async def test_restart_and_drain_of_one_rank_lose_nothing(
    dpsup: Harness, llama_server: Path, tiny_model: Path, router: str, tmp_path: Path
) -> None:
    deployment = await start(dpsup, 2, llama_server, tiny_model, router, tmp_path)
    sock = tmp_path / "admin.sock"
    port = (await deployment.status()).ranks[1].port
    async with open_load(router, clients=4) as load:
        await load.settle(8)
        with load.window("restart"):
            assert (await ctl(sock, "restart", "1", "--wait"))[0] == 0
        await load.settle(len(load.succeeded()) + 8)
        with load.window("drain"):
            code, out, err = await ctl(sock, "drain", "1")
            assert (code, err) == (0, ""), out
            await until_router(router, lambda listed: f"http://127.0.0.1:{port}" not in listed)
        with load.window("drained"):
            await load.settle(len(load.succeeded()) + 8)
        with load.window("undrain"):
            assert (await ctl(sock, "undrain", "1"))[0] == 0
            await until_router(router, lambda listed: f"http://127.0.0.1:{port}" in listed)
        await load.settle(len(load.succeeded()) + 8)
    assert load.failed() == [], load.summary()
    assert "did not stop within the grace period" not in log_of(deployment)
    status = await deployment.status()
    assert [r.restarts for r in status.ranks] == [0, 1]
    deployment.signal_supervisor(signal.SIGTERM)
    await exits(deployment)


async def test_sigterm_under_load_drains_and_exits_0(
    dpsup: Harness, llama_server: Path, tiny_model: Path, router: str, tmp_path: Path
) -> None:
    deployment = await start(dpsup, 2, llama_server, tiny_model, router, tmp_path)
    async with open_load(router, clients=4, max_tokens=64) as load:
        await load.settle(8)
        with load.window("sigterm"):
            signalled = trio.current_time()
            deployment.signal_supervisor(signal.SIGTERM)
            await exits(deployment)
            took = trio.current_time() - signalled
    # Every request whose bytes were all written to the router before the signal was
    # answered. One begun before it but still on its way (a Python client on a loaded
    # machine takes milliseconds to connect and write) can reach the router after every
    # worker was taken out, and gets its 503 "no available workers": the router's to say.
    before = [r for r in load.requests if r.sent is not None and r.sent < signalled]
    assert [r for r in before if not r.ok] == [], load.summary()
    log = log_of(deployment)
    assert "did not stop within the grace period" not in log
    assert "drained in" in log
    assert took < 10.0, f"{took:.2f}s from SIGTERM to exit"
    assert await router_lists(router) == set()


async def test_a_killed_rank_loses_at_most_the_clients_requests(
    dpsup: Harness, llama_server: Path, tiny_model: Path, router: str, tmp_path: Path
) -> None:
    deployment = await start(dpsup, 2, llama_server, tiny_model, router, tmp_path)
    async with open_load(router, clients=4) as load:
        await load.settle(8)
        with load.window("sigkill"):
            await deployment.signal_rank(1, signal.SIGKILL)
            await deployment.wait_for_status(
                lambda s: s.ranks[1].restarts == 1 and s.ranks[1].serving, "rank 1 back"
            )
        await load.settle(len(load.succeeded()) + 8)
    assert len(load.failed()) <= 4, load.summary()
    deployment.signal_supervisor(signal.SIGTERM)
    await exits(deployment)


async def test_a_request_longer_than_the_drain_timeout_is_the_only_loss(
    dpsup: Harness, llama_server: Path, tiny_model: Path, router: str, tmp_path: Path
) -> None:
    deployment = await start(
        dpsup, 1, llama_server, tiny_model, router, tmp_path, drain_timeout=1.0,
        grace_period=2.0,
    )  # fmt: skip
    port = (await deployment.status()).ranks[0].port
    async with trio.open_nursery() as nursery, httpx.AsyncClient(trust_env=False) as client:
        outcome: list[str] = []

        async def long_request() -> None:
            try:
                response = await client.post(
                    f"http://127.0.0.1:{port}/completion",
                    json={"prompt": "Once upon a time", "n_predict": 100_000, "ignore_eos": True},
                    timeout=30,
                )
                outcome.append(f"status {response.status_code}")
            except httpx.HTTPError as exc:
                outcome.append(type(exc).__name__)

        nursery.start_soon(long_request)
        with trio.fail_after(10):
            while not await _busy(client, port):  # noqa: ASYNC110 (the engine's own gauge)
                await trio.sleep(0.05)
        deployment.signal_supervisor(signal.SIGTERM)
        with trio.fail_after(40):
            code = await deployment.wait_exit()
    assert outcome, "the long request ended"
    assert outcome[0] != "status 200", outcome
    log = log_of(deployment)
    assert "rank 0 drained in" in log
    assert "1 request(s) still in flight at --drain-timeout 1s: they are lost" in log, log
    # llama-server does not exit on SIGTERM while a request's client waits (DESIGN.md):
    # after the drain timeout, the grace period ends it, and the run says so (exit 1).
    assert "ranks 0 had to be killed at the end of the grace period" in log
    assert code == 1


async def _busy(client: httpx.AsyncClient, port: int) -> bool:
    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    return "llamacpp:requests_processing 1" in text


async def test_the_router_never_lists_a_rank_taken_out_for_long(
    dpsup: Harness, llama_server: Path, tiny_model: Path, router: str, tmp_path: Path
) -> None:
    # Sampled every 50 ms through a rolling restart and a SIGTERM: a rank the supervisor
    # has taken out (out of /ranks) is gone from the router's list within 200 ms.
    deployment = await start(dpsup, 2, llama_server, tiny_model, router, tmp_path)
    sock = tmp_path / "admin.sock"
    urls = {r.rank: f"http://127.0.0.1:{r.port}" for r in (await deployment.status()).ranks}
    out_since: dict[int, float] = {}
    worst = 0.0
    done = trio.Event()

    async def sample() -> None:
        nonlocal worst
        async with httpx.AsyncClient(base_url=deployment.control_url, trust_env=False) as c:
            while not done.is_set():  # bounded by the events below
                # The router's list first, then /ranks: a rank /ranks shows out is measured
                # from when it was first seen out to when the router last listed it.
                listed_at = trio.current_time()
                listed = await router_lists(router)
                try:
                    ranks = (await c.get("/ranks")).json()["ranks"]
                except httpx.TransportError:
                    return  # the supervisor has exited
                seen_at = trio.current_time()
                for entry in ranks:
                    rank = entry["rank"]
                    if entry["ready"]:
                        out_since.pop(rank, None)
                        continue
                    since = out_since.setdefault(rank, seen_at)
                    if urls[rank] in listed:
                        worst = max(worst, listed_at - since)
                await trio.sleep(0.05)  # the sampling period

    async with open_load(router, clients=4) as load, trio.open_nursery() as nursery:
        await load.settle(4)
        nursery.start_soon(sample)
        assert (await ctl(sock, "rolling-restart", "--max-unavailable", "1"))[0] == 0
        await load.settle(len(load.succeeded()) + 4)
        deployment.signal_supervisor(signal.SIGTERM)
        await exits(deployment)
        done.set()
    assert worst <= 0.2, f"a rank out of /ranks stayed in the router for {worst:.3f}s"
