"""GPU awareness with NVML faked (CI has no GPU): device lists, placement, faults, leftovers.

The supervisor and its ranks are real processes; only what NVML would report is faked, and
it is injected through `Supervisor(config, nvml=...)`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Unpack

import pytest
import trio

from trio_dpsup import (
    ConfigError,
    GpuFailed,
    GpuLeftovers,
    GpuProcess,
    IssueKind,
    Owner,
    OwnerKind,
    PlacementVerdict,
    Supervisor,
    SupervisorConfig,
    SupervisorState,
    SupervisorStatus,
    plan_ranks,
)

# The pure units of device naming and placement, on purpose (tables of cases).
from trio_dpsup._config.devices import parse_visible_devices, resolve_devices_on
from trio_dpsup._gpu.nvml import MIB
from trio_dpsup._gpu.placement import check_placement
from trio_dpsup.testing import (
    FAKE_RANK,
    Deployment,
    FakeNvml,
    Form,
    Harness,
    SupervisorSettings,
    free_port_range,
    no_nvml,
    read_pid_file,
)

pytest_plugins = ["trio_dpsup.testing.plugin"]

PY = sys.executable
#: The environment without CUDA_VISIBLE_DEVICES: devices come from (fake) NVML.
ENV = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
#: Settings for GPU ranks under the harness: one GPU each, fast readings.
GPU_SETTINGS: SupervisorSettings = {"gpus_per_rank": 1, "gpu_interval": 0.1}


# -- CUDA_VISIBLE_DEVICES and --devices -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "devices"),
    [
        ("0,1", ("0", "1")),
        (" 2 , 03 ", ("2", "3")),
        ("", ()),
        ("-1", ()),
        ("0,-1,1", ("0",)),  # CUDA stops at the first entry that is not a device
        ("1,gpu0", ("1",)),
        ("GPU-8a1b,MIG-4c5d", ("GPU-8a1b", "MIG-4c5d")),
        ("MIG-GPU-8a1b/1/0", ("MIG-GPU-8a1b/1/0",)),  # the legacy MIG form
    ],
)
def test_cuda_visible_devices_is_read_as_cuda_reads_it(text: str, devices: tuple[str, ...]) -> None:
    assert parse_visible_devices(text, strict=False, source="CUDA_VISIBLE_DEVICES") == devices


def test_devices_option_is_strict() -> None:
    with pytest.raises(ConfigError, match="--devices has 'gpu0', which is not a device"):
        parse_visible_devices("0,gpu0", strict=True, source="--devices")
    with pytest.raises(ConfigError, match="device 1 is listed twice in --devices"):
        parse_visible_devices("1,01", strict=True, source="--devices")


def test_names_resolve_by_index_uuid_prefix_and_mig() -> None:
    fake = FakeNvml(gpus=3, mig=2)
    gpu1, gpu2 = fake.gpus[1], fake.gpus[2]
    migs = [d for d in fake.devices if d.is_mig]
    names = ["2", gpu1.uuid[:12], migs[1].uuid]
    assert resolve_devices_on(names, fake.devices, source="x") == (gpu2, gpu1, migs[1])
    with pytest.raises(ConfigError, match="names GPU 3, but NVML sees 3 GPU"):
        resolve_devices_on(["3"], fake.devices, source="x")
    with pytest.raises(ConfigError, match="matches no device"):
        resolve_devices_on(["GPU-ffff"], fake.devices, source="x")
    with pytest.raises(ConfigError, match="matches 3 devices"):
        resolve_devices_on(["GPU-"], fake.devices, source="x")
    with pytest.raises(ConfigError, match="twice"):
        resolve_devices_on(["1", gpu1.uuid], fake.devices, source="x")


# -- the plan -------------------------------------------------------------------------------


def config(
    command: tuple[str, ...] = (PY, "--port", "{port}", "--gpus", "{gpus}"),
    ranks: int | None = None,
    **overrides: Unpack[SupervisorSettings],
) -> SupervisorConfig:
    return SupervisorConfig(command=command, ranks=ranks, **overrides)


def test_ranks_default_to_every_gpu_nvml_sees() -> None:
    fake = FakeNvml(gpus=4)
    plans = plan_ranks(config(gpus_per_rank=2), ENV, fake.inventory())
    assert [p.devices for p in plans] == [("0", "1"), ("2", "3")]
    assert [p.argv[-1] for p in plans] == ["0,1", "2,3"]
    # Indices mean the same GPU to CUDA as to NVML only in PCI bus order.
    assert dict(plans[1].env) == {"CUDA_VISIBLE_DEVICES": "2,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert plans[1].gpus == fake.gpus[2:]


def test_uuids_stay_uuids() -> None:
    fake = FakeNvml(gpus=2)
    uuids = f"{fake.gpus[1].uuid},{fake.gpus[0].uuid}"
    plans = plan_ranks(config(), {**ENV, "CUDA_VISIBLE_DEVICES": uuids}, fake.inventory())
    assert [dict(p.env) for p in plans] == [
        {"CUDA_VISIBLE_DEVICES": fake.gpus[1].uuid},
        {"CUDA_VISIBLE_DEVICES": fake.gpus[0].uuid},
    ]
    assert [p.gpus for p in plans] == [(fake.gpus[1],), (fake.gpus[0],)]


def test_mig_instances_are_handed_out_by_uuid() -> None:
    fake = FakeNvml(gpus=2, mig=3)  # GPU 0 split in three, GPU 1 whole
    plans = plan_ranks(config(), ENV, fake.inventory())
    migs = [d.uuid for d in fake.devices if d.is_mig]
    assert [p.devices for p in plans] == [(m,) for m in migs] + [(fake.gpus[1].uuid,)]
    assert all("CUDA_DEVICE_ORDER" not in dict(p.env) for p in plans)


def test_device_nvml_does_not_have_is_refused() -> None:
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES='0,5' names GPU 5"):
        plan_ranks(config(), {**ENV, "CUDA_VISIBLE_DEVICES": "0,5"}, FakeNvml(2).inventory())


def test_zero_gpus_per_rank_hides_every_gpu() -> None:
    plans = plan_ranks(config(command=(PY,), ranks=2, gpus_per_rank=0), ENV, FakeNvml().inventory())
    assert [dict(p.env) for p in plans] == [{"CUDA_VISIBLE_DEVICES": ""}] * 2
    with pytest.raises(ConfigError, match="--gpus-per-rank is 0, so the rank count"):
        plan_ranks(config(command=(PY,), gpus_per_rank=0), ENV, FakeNvml().inventory())


def test_without_nvml_the_reason_is_in_the_message() -> None:
    with pytest.raises(ConfigError, match=r"NVML is unavailable: no driver\), so the rank count"):
        plan_ranks(config(command=(PY,)), ENV, None, nvml_problem="no driver")


OUTSIDE = Owner(OwnerKind.OUTSIDE)
UNKNOWN = Owner(OwnerKind.UNKNOWN)


# -- the placement verdicts -----------------------------------------------------------------


def test_placement_verdicts() -> None:
    ranks = {0: ["A"], 1: ["B"], 2: ["C"]}
    on_device = {
        "A": [GpuProcess(100, None)],  # rank 0 on its own GPU
        "B": [GpuProcess(101, None), GpuProcess(200, None), GpuProcess(102, None)],
        "C": [GpuProcess(300, None)],
        "D": [GpuProcess(103, None)],  # nobody's GPU
    }
    rank = Owner.of_rank
    table = {100: rank(0), 101: rank(1), 200: OUTSIDE, 102: rank(2), 300: UNKNOWN, 103: rank(2)}
    verdicts = check_placement(ranks, on_device, table.__getitem__)
    assert verdicts[0].verdict is PlacementVerdict.OK
    assert verdicts[1].verdict is PlacementVerdict.MISPLACED
    assert [(i.kind, i.pid, i.owner) for i in verdicts[1].issues] == [
        (IssueKind.FOREIGN, 200, OUTSIDE),
        (IssueKind.FOREIGN, 102, rank(2)),
    ]
    assert [i.describe(1) for i in verdicts[1].issues] == [
        "rank 1: pid 200 (outside the supervised trees) uses its GPU B",
        "rank 1: pid 102 (rank 2) uses its GPU B",
    ]
    # Rank 2 runs on B and D, not on its own C (where a pid we cannot resolve runs).
    assert [(i.kind, i.gpu) for i in verdicts[2].issues] == [
        (IssueKind.WRONG_GPU, "B"),
        (IssueKind.WRONG_GPU, "D"),
    ]
    absent = check_placement({0: ["A"]}, {"A": []}, table.__getitem__)[0]
    assert [(i.kind, i.gpu) for i in absent.issues] == [(IssueKind.ABSENT, "A")]
    unknown = check_placement({0: ["C"]}, {"C": on_device["C"]}, table.__getitem__)[0]
    assert unknown.verdict is PlacementVerdict.UNKNOWN


# -- the supervisor with a fake NVML --------------------------------------------------------


async def rank_pids(deployment: Deployment) -> list[int]:
    return [r.pid for r in (await deployment.status()).ranks if r.pid is not None]


async def wait_for_verdicts(
    deployment: Deployment, verdicts: list[PlacementVerdict]
) -> SupervisorStatus:
    def holds(status: SupervisorStatus) -> bool:
        return [r.placement.verdict for r in status.ranks] == verdicts

    with trio.fail_after(10):
        return await deployment.wait_for_status(holds, f"placement {verdicts}")


OK = PlacementVerdict.OK


async def test_status_shows_each_rank_on_its_gpu_with_placement_ok(dpsup: Harness) -> None:
    fake = FakeNvml(gpus=2)
    deployment = await dpsup.start(2, nvml=fake.factory, **GPU_SETTINGS)
    for pid, gpu in zip(await rank_pids(deployment), fake.gpus, strict=True):
        fake.place(pid, gpu.uuid, used_mib=2048)
    await wait_for_verdicts(deployment, [OK, OK])
    # A refresh reads memory before it checks placement: the verdict can come from a refresh
    # whose readings were taken just before the placing. Wait for the readings too.
    with trio.fail_after(10):
        status = await deployment.wait_for_status(
            lambda s: all(r.gpu_samples[0].memory_used == 2048 * MIB for r in s.ranks),
            "the readings after the placing",
        )
    assert [r.placement.verdict for r in status.ranks] == [OK, OK]
    # The same in the /status document.
    document = await deployment.status_document()
    assert [r["placement"]["verdict"] for r in document["ranks"]] == ["ok", "ok"]
    for rank, gpu in zip(document["ranks"], fake.gpus, strict=True):
        (reading,) = rank["gpus"]
        assert (reading["index"], reading["uuid"]) == (gpu.index, gpu.uuid)
        assert reading["memory_used_mib"] == 2048
        assert reading["memory_total_mib"] == gpu.memory_total // 2**20
        assert reading["temperature_c"] == 40
    assert document["nvml"] == {"available": True, "problem": None}
    deployment.signal_supervisor(signal.SIGTERM)
    assert await deployment.wait_exit() == 0
    assert fake.closed == fake.opened == 1


@pytest.mark.parametrize("kind", ["setproctitle", "env-i"])
async def test_an_engine_child_that_renamed_itself_is_its_ranks(
    dpsup: Harness, kind: str, tmp_path: Path
) -> None:
    # As vLLM's engine core: the GPU is held by the rank's child, which called setproctitle
    # (/proc no longer shows its tree cookie) or was started with env -i. It is still in the
    # rank's session, so placement knows it as the rank's.
    pytest.importorskip("setproctitle", reason="the setproctitle test extra is not installed")
    fake = FakeNvml(gpus=2)
    pid_files = tmp_path / "pids-{rank}"
    rank_args = ["--grandchild", kind, "--pid-file", str(pid_files)]
    deployment = await dpsup.start(2, nvml=fake.factory, rank_args=rank_args, **GPU_SETTINGS)
    for rank, gpu in enumerate(fake.gpus):
        engine = read_pid_file(tmp_path / f"pids-{rank}")[f"grandchild-{kind}"]
        fake.place(engine, gpu.uuid, used_mib=2048)
    status = await wait_for_verdicts(deployment, [OK, OK])
    assert all(not r.placement.issues for r in status.ranks)
    deployment.signal_supervisor(signal.SIGTERM)
    assert await deployment.wait_exit() == 0


async def test_rank_on_the_wrong_gpu_is_flagged(dpsup: Harness) -> None:
    fake = FakeNvml(gpus=2)
    deployment = await dpsup.start(2, nvml=fake.factory, **GPU_SETTINGS)
    pid0, pid1 = await rank_pids(deployment)
    fake.place(pid0, fake.gpus[1].uuid)  # rank 0 is on GPU 1
    fake.place(pid1, fake.gpus[1].uuid)
    fake.place(os.getpid(), fake.gpus[1].uuid)  # and so is a process outside the trees
    # The first check may have run before the processes were placed: wait for one after.
    expected = [
        [IssueKind.ABSENT, IssueKind.WRONG_GPU],
        [IssueKind.FOREIGN, IssueKind.FOREIGN],
    ]
    with trio.fail_after(10):
        status = await deployment.wait_for_status(
            lambda s: [[i.kind for i in r.placement.issues] for r in s.ranks] == expected,
            f"issues {expected}",
        )
    assert {r.placement.verdict for r in status.ranks} == {PlacementVerdict.MISPLACED}
    texts = [[i.describe(r.rank) for i in r.placement.issues] for r in status.ranks]
    assert [i.owner for i in status.ranks[1].placement.issues] == [Owner.of_rank(0), OUTSIDE]
    gpu0, gpu1 = fake.gpus[0].uuid, fake.gpus[1].uuid
    assert texts[0] == [
        f"rank 0: no process of its tree uses its GPU {gpu0}",
        f"rank 0: pid {pid0} uses {gpu1}, which is not one of its GPUs",
    ]
    assert texts[1] == [
        f"rank 1: pid {pid0} (rank 0) uses its GPU {gpu1}",
        f"rank 1: pid {os.getpid()} (outside the supervised trees) uses its GPU {gpu1}",
    ]
    assert await deployment.ready_code() == 200  # flagged, not failed
    fake.remove(os.getpid())


@pytest.mark.parametrize("fault", ["lost", "xid"])
async def test_gpu_fault_fails_its_rank(dpsup: Harness, fault: str) -> None:
    fake = FakeNvml(gpus=2)
    deployment = await dpsup.start(
        2, nvml=fake.factory, rank_args=["--stop-delay", "0.5"], **GPU_SETTINGS
    )
    if fault == "lost":
        fake.lose(fake.gpus[1].uuid)
        cause = "NVML reports it lost (GPU is lost)"
    else:
        fake.xid(fake.gpus[1].uuid, 79)
        cause = "critical Xid error 79"
    await deployment.wait_for_state(SupervisorState.STOPPING)
    assert await deployment.ready_code() == 503
    assert await deployment.wait_exit() == 1
    failure = await deployment.failure()
    assert isinstance(failure, GpuFailed)
    assert (failure.rank, failure.gpu) == (1, f"GPU 1 ({fake.gpus[1].uuid})")
    assert str(failure) == f"rank 1: GPU 1 ({fake.gpus[1].uuid}) failed: {cause}"
    await deployment.assert_no_leftovers()


async def test_xid_on_a_gpu_no_rank_uses_is_ignored(dpsup: Harness) -> None:
    fake = FakeNvml(gpus=3)
    deployment = await dpsup.start(2, nvml=fake.factory, **GPU_SETTINGS)
    fake.xid(fake.gpus[2].uuid, 79)
    fake.xid(fake.gpus[0].uuid, 48)  # a marker: once this one fails rank 0, 79 was seen
    assert await deployment.wait_exit() == 1
    expected = f"rank 0: GPU 0 ({fake.gpus[0].uuid}) failed: critical Xid error 48"
    assert str(await deployment.failure()) == expected


@pytest.fixture
def stray_process() -> Iterator[int]:
    """A process outside any rank tree, as an orphaned worker of an earlier run would be."""
    with subprocess.Popen([PY, "-c", "import time; time.sleep(600)"]) as proc:
        try:
            yield proc.pid
        finally:
            proc.kill()


@pytest.mark.parametrize("fail_on_leftovers", [False, True])
async def test_leftovers_on_rank_gpus_are_reported(
    stray_process: int, fail_on_leftovers: bool, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeNvml(gpus=2)
    fake.place(stray_process, fake.gpus[1].uuid, used_mib=4096)
    command = (*FAKE_RANK, "--port", "{port}")
    cfg = SupervisorConfig(
        command=command,
        base_port=free_port_range(2),
        control_port=0,
        fail_on_leftovers=fail_on_leftovers,
    )
    outcome: list[BaseException] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                _run_catching, Supervisor(cfg, environ=ENV, nvml=fake.factory), outcome
            )
            await handle.wait_ready()
            handle.request_shutdown()
            status = await handle.wait_stopped()
    line = f"pid {stray_process} (python"
    # Reported in both cases; --fail-on-leftovers only decides the exit status.
    reports = [
        r.getMessage() for r in caplog.records if "left over after shutdown" in r.getMessage()
    ]
    assert len(reports) == 1
    assert line in reports[0]
    assert "holds 4096 MiB on GPU 1" in reports[0]
    if fail_on_leftovers:
        assert status == 1
        (failure,) = outcome
        assert isinstance(failure, GpuLeftovers)
        (holder,) = failure.leftovers
        assert (holder.pid, holder.memory_mib, holder.owner) == (stray_process, 4096, OUTSIDE)
        assert holder.gpu == fake.gpus[1].label
        assert line in holder.describe()
    else:
        assert status == 0
        assert outcome == []


async def test_without_nvml_everything_else_works(dpsup: Harness) -> None:
    deployment = await dpsup.start(2, nvml=no_nvml, form=Form.LIBRARY)
    status = await deployment.status()
    assert status.nvml_unavailable == "NVML Shared Library Not Found"
    assert {r.placement.verdict for r in status.ranks} == {PlacementVerdict.UNAVAILABLE}
    assert [r.gpus for r in status.ranks] == [(), ()]
    document = await deployment.status_document()
    assert document["nvml"] == {"available": False, "problem": "NVML Shared Library Not Found"}


async def _run_catching(
    supervisor: Supervisor, outcome: list[BaseException], task_status: trio.TaskStatus[object]
) -> None:
    try:
        await supervisor.run(task_status=task_status)
    except (GpuFailed, GpuLeftovers) as exc:
        outcome.append(exc)
