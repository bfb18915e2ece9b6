"""Discovery: /ranks for routers (with long polls) and /prometheus/targets for Prometheus."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trio_dpsup.testing import Form, Harness, free_port_range

from .conftest import FORMS, on_failure

pytest_plugins = ["trio_dpsup.testing.plugin"]

QUICK = on_failure(0.5)


async def get_json(client: httpx.AsyncClient, url: str) -> Any:
    response = await client.get(url)
    response.raise_for_status()
    return response.json()


@FORMS
async def test_ranks_and_a_long_poll_that_answers_on_a_change(dpsup: Harness, form: Form) -> None:
    deployment = await dpsup.start(2, form=form, **QUICK)
    async with httpx.AsyncClient(base_url=deployment.control_url, trust_env=False) as client:
        first = await get_json(client, "/ranks")
        assert (first["schema"], first["run_id"], first["state"]) == (1, deployment.run_id, "ready")
        assert [(r["rank"], r["local_rank"], r["state"], r["ready"]) for r in first["ranks"]] == [
            (0, 0, "ready", True),
            (1, 1, "ready", True),
        ]
        assert [r["url"] for r in first["ranks"]] == [
            f"http://127.0.0.1:{port}" for port in deployment.ports
        ]
        # Nothing changed: a long poll waits its time out, then answers the same version.
        same = await get_json(client, f"/ranks?wait=0.2&version={first['version']}")
        assert same["version"] == first["version"]
        # A rank crashes while a router waits: it hears of it at once, not after 30 s.
        answer: list[Any] = []

        async def poll() -> None:
            answer.append(await get_json(client, f"/ranks?wait=30&version={first['version']}"))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                await deployment.crash_rank(1, 3)
        (changed,) = answer
        assert changed["version"] > first["version"]
        assert changed["ranks"][1]["ready"] is False
        assert changed["ranks"][1]["state"] in ("restarting", "starting")
        assert changed["ranks"][1]["since"] > first["ranks"][1]["since"]
        # An old version is answered at once.
        with trio.fail_after(5):
            stale = await get_json(client, f"/ranks?wait=30&version={first['version']}")
        assert stale["version"] >= changed["version"]
        assert (await client.get("/ranks?wait=soon")).status_code == 400


async def test_prometheus_targets_name_every_ranks_metrics(dpsup: Harness) -> None:
    deployment = await dpsup.start(2, metrics_path="/metrics")
    async with httpx.AsyncClient(base_url=deployment.control_url, trust_env=False) as client:
        targets = await get_json(client, "/prometheus/targets")
    assert targets == [
        {
            "targets": [f"127.0.0.1:{port}"],
            "labels": {
                "rank": str(rank),
                "local_rank": str(rank),
                "gpus": "",
                "__metrics_path__": "/metrics",
                "__scheme__": "http",
            },
        }
        for rank, port in enumerate(deployment.ports)
    ]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")
async def test_a_real_prometheus_scrapes_every_rank_from_the_targets(
    dpsup: Harness, tmp_path: Path
) -> None:
    deployment = await dpsup.start(2)  # the fake ranks serve /metrics
    port = free_port_range(1)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: ranks\n"
        "    http_sd_configs:\n"
        f"      - url: {deployment.control_url}/prometheus/targets\n"
        "        refresh_interval: 1s\n"
    )
    process = await trio.lowlevel.open_process(
        [
            "prometheus", f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    up: list[Any] = []
    try:
        async with httpx.AsyncClient(trust_env=False) as client:
            with trio.fail_after(60):
                for _ in range(120):  # until both ranks are scraped healthy
                    try:
                        answer = await client.get(f"http://127.0.0.1:{port}/api/v1/targets")
                        active = answer.json()["data"]["activeTargets"]
                    except (httpx.TransportError, ValueError, KeyError):
                        active = []
                    up = [t for t in active if t["health"] == "up"]
                    if len(up) == 2:
                        break
                    await trio.sleep(0.5)  # pacing: Prometheus scrapes every second
    finally:
        process.kill()
        await process.wait()
    assert sorted(t["labels"]["rank"] for t in up) == ["0", "1"]
