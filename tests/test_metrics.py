"""/metrics parses with prometheus-client's own text parser and says what /status says."""

from __future__ import annotations

import platform
import shutil
import time
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import trio_dpsup
from trio_dpsup import RankState, SupervisorState
from trio_dpsup.testing import FakeNvml, Form, Harness

from .conftest import on_failure

pytest_plugins = ["trio_dpsup.testing.plugin"]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, for every sample of every family."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(url: str) -> tuple[str, dict[Any, float]]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text, samples(response.text)


async def test_metrics_of_a_ready_supervisor_parse(dpsup: Harness) -> None:
    deployment = await dpsup.start(2, form=Form.CLI, probe_interval=0.05)
    # Each ready rank is probed every 50 ms: wait until both have a few probes recorded in
    # the histogram (startup probes are not: the first ready probe alone would not do).
    with trio.fail_after(10):
        for _ in range(200):  # bounded; each scrape paces the next
            text, found = await scrape(deployment.control_url)
            counts = [
                found.get(("trio_dpsup_probe_duration_seconds_count", (("rank", r),)), 0.0)
                for r in ("0", "1")
            ]
            if min(counts) >= 3:
                break
            await trio.sleep(0.05)
    assert min(counts) >= 3, counts
    for rank in ("0", "1"):
        assert found[("trio_dpsup_rank_up", (("rank", rank),))] == 1.0
        assert found[("trio_dpsup_rank_state", (("rank", rank), ("state", "ready")))] == 1.0
        assert found[("trio_dpsup_rank_state", (("rank", rank), ("state", "failed")))] == 0.0
        assert found[("trio_dpsup_rank_restarts_total", (("rank", rank),))] == 0.0
    assert found[("trio_dpsup_state", (("state", "ready"),))] == 1.0
    assert found[("trio_dpsup_uptime_seconds", ())] > 0
    assert (
        0
        < found[("trio_dpsup_time_to_ready_seconds", ())]
        < found[("trio_dpsup_uptime_seconds", ())]
    )
    assert "# TYPE trio_dpsup_probe_duration_seconds histogram" in text
    assert "trio_dpsup_gpu_" not in text  # no NVML, or no GPU per rank: no GPU gauges


async def test_probe_failures_and_exit_status_are_counted(dpsup: Harness) -> None:
    deployment = await dpsup.start(
        2, rank_args=["--stop-delay", "1"], probe_interval=0.05, failure_threshold=3
    )
    await deployment.fail_health(1, 500)
    await deployment.wait_for_state(SupervisorState.STOPPING)
    _, found = await scrape(deployment.control_url)
    assert found[("trio_dpsup_probe_failures_total", (("rank", "1"),))] == 3.0
    assert found[("trio_dpsup_probe_failures_total", (("rank", "0"),))] == 0.0  # from 0
    count = found[("trio_dpsup_probe_duration_seconds_count", (("rank", "1"),))]
    assert count >= 3
    assert found[("trio_dpsup_state", (("state", "stopping"),))] == 1.0
    assert await deployment.wait_exit() == 1


async def test_gpu_gauges_with_nvml(dpsup: Harness) -> None:
    fake = FakeNvml(gpus=2)
    deployment = await dpsup.start(2, nvml=fake.factory, gpus_per_rank=1, gpu_interval=0.1)
    status = await deployment.status()
    pid = status.ranks[0].pid
    assert pid is not None
    fake.place(pid, fake.gpus[0].uuid, used_mib=300)
    await deployment.wait_for_status(
        lambda s: s.ranks[0].gpu_samples[0].memory_used == 300 * 2**20, "the reading"
    )
    _, found = await scrape(deployment.control_url)
    labels = (("gpu", fake.gpus[0].uuid), ("rank", "0"))
    assert found[("trio_dpsup_gpu_memory_used_bytes", labels)] == 300 * 2**20
    assert found[("trio_dpsup_gpu_memory_total_bytes", labels)] == fake.gpus[0].memory_total
    assert found[("trio_dpsup_gpu_utilization_ratio", labels)] == 0.5
    assert found[("trio_dpsup_gpu_temperature_celsius", labels)] == 40.0
    assert found[("trio_dpsup_gpu_power_watts", labels)] == 100.0


async def test_exit_status_and_restart_time_outlive_the_restart(dpsup: Harness) -> None:
    deployment = await dpsup.start(1, **on_failure(0.1))
    before = time.time()
    await deployment.crash_rank(0, 7)
    with trio.fail_after(10):
        await deployment.wait_for_status(
            lambda s: s.ranks[0].restarts == 1 and s.ranks[0].state is RankState.READY,
            "rank 0 ready again",
        )
    _, found = await scrape(deployment.control_url)
    assert found[("trio_dpsup_rank_exit_status", (("rank", "0"),))] == 7.0
    restarted = found[("trio_dpsup_rank_last_restart_timestamp_seconds", (("rank", "0"),))]
    assert before <= restarted <= time.time()
    build = [key for key in found if key[0] == "trio_dpsup_build_info"]
    assert build == [
        (
            "trio_dpsup_build_info",
            (("python", platform.python_version()), ("version", trio_dpsup.__version__)),
        )
    ]
    assert found[("process_open_fds", ())] > 0
    assert found[("process_resident_memory_bytes", ())] > 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
async def test_promtool_accepts_the_metrics(dpsup: Harness) -> None:
    deployment = await dpsup.start(2)
    text, _ = await scrape(deployment.control_url)
    result = await trio.run_process(
        ["promtool", "check", "metrics"], stdin=text.encode(), capture_stdout=True,
        capture_stderr=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
