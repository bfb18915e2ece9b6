"""Discovery: /ranks for routers (with long polls) and /prometheus/targets for Prometheus."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from trio_dpsup import RestartPolicy
from trio_dpsup.testing import Form, Harness

pytest_plugins = ["trio_dpsup.testing.plugin"]

FORMS = pytest.mark.parametrize("form", list(Form), ids=lambda form: form.value)
QUICK = {
    "restart": RestartPolicy.ON_FAILURE,
    "restart_backoff_min": 0.5,
    "restart_backoff_max": 0.5,
}


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
