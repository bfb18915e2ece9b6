"""On a machine with real GPUs (NVML and torch): each rank on its own GPU, with its memory.

Skipped where there is no NVML or no torch, as on CI. docs/gpu-record.md records a run on
real GPUs of these checks and more (bench/gpu_validation.py).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import trio

from trio_dpsup import NvmlUnavailable, PlacementVerdict, open_pynvml
from trio_dpsup.testing import Harness

pytest_plugins = ["trio_dpsup.testing.plugin"]


def _gpu_count() -> int:
    try:
        backend = open_pynvml()
    except NvmlUnavailable:
        return 0
    try:
        return sum(1 for gpu in backend.inventory() if not gpu.is_mig)
    finally:
        backend.close()


GPUS = _gpu_count()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPUS == 0, reason="no NVML or no GPU here"),
    pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="no torch here"),
]


async def test_each_rank_holds_memory_on_its_own_gpu(dpsup: Harness) -> None:
    command = [sys.executable, "-m", "trio_dpsup.demo", "--port", "{port}", "--allocate", "512"]
    deployment = await dpsup.start(GPUS, command=command, gpus_per_rank=1, gpu_interval=0.5)
    with trio.fail_after(60):
        await deployment.wait_for_status(
            lambda s: all(r.placement.verdict is PlacementVerdict.OK for r in s.ranks),
            "placement ok",
        )
    document = await deployment.status_document()
    for index, rank in enumerate(document["ranks"]):
        (gpu,) = rank["gpus"]
        assert gpu["index"] == index
        assert gpu["memory_used_mib"] >= 512
