"""/metrics parses with prometheus-client's own text parser and says what /status says."""

from __future__ import annotations

from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_dpsup import SupervisorState
from trio_dpsup.testing import FakeNvml, Form, Harness

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
    assert ("trio_dpsup_probe_failures_total", (("rank", "0"),)) not in found
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
