"""The /status document carries the whole typed status: what the library's snapshot says, a
CLI supervisor's /status says too, failures included (the harness relies on it)."""

from __future__ import annotations

import dataclasses
import json

import trio_dpsup
from trio_dpsup import (
    GenerationFailed,
    GpuFailed,
    GpuHolder,
    GpuLeftovers,
    GpuMemoryHeld,
    GroupFailed,
    Owner,
    OwnerKind,
    PortHolder,
    PortInUse,
    RankExited,
    RankSpawnFailed,
    RankStalled,
    RankStartTimeout,
    RankUnhealthy,
    RestartedWith,
    RestartRequested,
    RestartsExhausted,
    StartupStalled,
    StartupTimeout,
    SupervisorFailure,
    SupervisorState,
    SupervisorStatus,
)

# The /status document's codec itself, on purpose: every failure kind round-trips.
from trio_dpsup._state.document import failure_from_json, failure_to_json, status_from_json
from trio_dpsup.testing import FakeNvml, Harness

pytest_plugins = ["trio_dpsup.testing.plugin"]

HOLDER = GpuHolder(pid=12, name="python", owner=Owner.of_rank(1), memory_mib=2048, gpu="GPU 0")
EXAMPLES: list[SupervisorFailure] = [
    RankExited(1, -9),
    RankSpawnFailed(0, "No such file or directory"),
    RankUnhealthy(2, 3, "HTTP 503"),
    StartupTimeout(30.0, (1, 2)),
    RankStartTimeout(1, 5.0),
    RankStalled(2, "vllm:num_requests_running", 4.0, "vllm:generation_tokens_total", 812.0, 31.5),
    GenerationFailed(1, 2, "no answer within 10s"),
    StartupStalled(0, 300.5, "output lines, 12.0s after the start"),
    RestartsExhausted(RankExited(3, 7), 3, 60.0),
    RestartedWith(0, RankUnhealthy(2, 3, "no answer")),
    RestartRequested(2),
    GpuFailed(1, "GPU 1 (GPU-x)", "critical Xid error 79"),
    GpuLeftovers((HOLDER,)),
    GroupFailed(1, "10.0.0.2", "rank 3 exited unexpectedly: killed by SIGKILL"),
    GroupFailed(2, None, "never appeared within --startup-timeout 60s"),
    PortInUse(1, 8001, (PortHolder(7, "python -m x", Owner(OwnerKind.OUTSIDE)),), 30.0),
    PortInUse(1, 8001, (PortHolder(None, None, Owner(OwnerKind.UNKNOWN)),), 30.0),
    GpuMemoryHeld(1, (HOLDER,), 60.0, foreign=False),
]


def fields(failure: BaseException) -> tuple[type, str, dict[str, object]]:
    """A failure as comparable data: its type, message and attributes (nested ones too)."""
    attributes = {
        name: fields(value) if isinstance(value, BaseException) else value
        for name, value in vars(failure).items()
        if not name.startswith("_")
    }
    return type(failure), str(failure), attributes


def test_every_failure_kind_survives_the_wire() -> None:
    kinds = {
        value
        for name in trio_dpsup.__all__
        if isinstance(value := getattr(trio_dpsup, name), type)
        and issubclass(value, SupervisorFailure)
        and value is not SupervisorFailure
    }
    assert {type(e) for e in EXAMPLES} == kinds, "an example for each kind"
    for failure in EXAMPLES:
        wire = json.loads(json.dumps(failure_to_json(failure)))
        assert fields(failure_from_json(wire)) == fields(failure)


def test_a_kind_from_a_newer_supervisor_keeps_its_message_and_rank() -> None:
    failure = failure_from_json({"type": "RankMelted", "message": "rank 4 melted", "rank": 4})
    assert (type(failure), str(failure), failure.rank) == (SupervisorFailure, "rank 4 melted", 4)


def comparable(status: SupervisorStatus) -> SupervisorStatus:
    """Without what the wire rounds (latency to microseconds) or carries as data (failures)."""
    ranks = tuple(dataclasses.replace(r, last_probe=None, last_causes=()) for r in status.ranks)
    return dataclasses.replace(status, ranks=ranks, failure=None)


async def test_status_parsed_from_the_document_is_the_snapshot(dpsup: Harness) -> None:
    fake = FakeNvml(gpus=2)
    deployment = await dpsup.start(2, nvml=fake.factory, gpus_per_rank=1, gpu_interval=0.1)
    await deployment.crash_rank(1, 3)
    await deployment.wait_for_state(SupervisorState.STOPPING)
    snapshot = await deployment.status()
    parsed = status_from_json(await deployment.status_document())
    later = await deployment.status()  # the document was read between the two
    assert comparable(parsed) in (comparable(snapshot), comparable(later))
    assert parsed.failure is not None
    assert fields(parsed.failure) == fields(RankExited(1, 3))
    assert parsed.ranks[1].gpus == snapshot.ranks[1].gpus
