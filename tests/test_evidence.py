"""Evidence before a kill: the stacks, last lines and status of a rank failed while it
still runs, written before its SIGTERM; none for a rank that already exited."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Unpack

import pytest
import trio

from trio_dpsup import GpuFailed, RankStalled, SupervisorState
from trio_dpsup.testing import (
    Deployment,
    FakeNvml,
    Fault,
    Form,
    Harness,
    SupervisorSettings,
    alive,
    inject_fault,
    wait_pids_gone,
)
from trio_dpsup.testing.fake_rank import METRIC_NAMES

from .conftest import FORMS

pytest_plugins = ["trio_dpsup.testing.plugin"]

BUSY, TOKENS = METRIC_NAMES["fake"]


def stall_settings(evidence: Path, **more: Unpack[SupervisorSettings]) -> SupervisorSettings:
    return {
        "progress_timeout": 0.5,
        "progress_interval": 0.1,
        "progress_busy_metric": BUSY,
        "progress_metric": TOKENS,
        "evidence_dir": str(evidence),
        **more,
    }


def the_folder(evidence: Path) -> Path:
    (run,) = evidence.iterdir()
    (folder,) = run.iterdir()
    return folder


@FORMS
async def test_a_stalled_rank_leaves_its_stacks_lines_and_status(
    dpsup: Harness, form: Form, tmp_path: Path
) -> None:
    evidence = tmp_path / "evidence"
    deployment = await dpsup.start(
        2, form=form, rank_args=["--log-lines", "4"], **stall_settings(evidence)
    )
    await deployment.stall(1)
    with trio.fail_after(20):
        assert await deployment.wait_exit() == 1
    failure = await deployment.failure()
    assert isinstance(failure, RankStalled)
    folder = the_folder(evidence)
    assert folder.name.endswith("-rank1")
    assert folder.parent.name == deployment.run_id
    # Its path is in the final status: the rank's entry and the root cause.
    final = await deployment.final_status()
    assert final.ranks[1].evidence == str(folder)
    assert final.root_cause is not None
    assert final.root_cause.evidence == str(folder)
    assert f"rank 1 stalled: {BUSY}" in (folder / "cause.txt").read_text()
    log = (folder / "log.txt").read_text()
    port = deployment.ports[1]
    assert f"stderr| fake rank {port}: log line 1 of 4" in log
    assert f"stdout| fake rank {port}: log line 2 of 4" in log
    entry = json.loads((folder / "status.json").read_text())
    assert (entry["rank"], entry["state"], entry["port"]) == (1, "failed", port)
    stacks = (folder / "stacks.txt").read_text()
    assert f"==== pid {entry['pid']} ====" in stacks
    if "py-spy is not installed" in stacks or "Permission" in stacks:
        pytest.skip(f"py-spy cannot take stacks here: {stacks.splitlines()[1]}")
    assert "engine_step_stalled_in_fake_rank" in stacks
    # Rank 0 did not fail: no evidence of its own.
    assert final.ranks[0].evidence is None


async def test_the_capture_is_bounded(dpsup: Harness, tmp_path: Path) -> None:
    evidence = tmp_path / "evidence"
    deployment = await dpsup.start(1, **stall_settings(evidence, evidence_timeout=0.0))
    await deployment.stall(0)
    with trio.fail_after(20):
        assert await deployment.wait_exit() == 1
    stacks = (the_folder(evidence) / "stacks.txt").read_text()
    if "py-spy is not installed" in stacks:
        pytest.skip("py-spy is not installed: nothing to cut")
    assert "cut: no dump within --evidence-timeout 0s" in stacks


async def test_no_evidence_for_a_rank_that_already_exited(dpsup: Harness, tmp_path: Path) -> None:
    evidence = tmp_path / "evidence"
    deployment = await dpsup.start(2, evidence_dir=str(evidence))
    await deployment.crash_rank(1, 3)
    with trio.fail_after(20):
        stopping = await deployment.wait_for_state(SupervisorState.STOPPING)
        assert await deployment.wait_exit() == 3
    assert stopping.ranks[1].evidence is None
    assert not evidence.exists() or not any(evidence.iterdir())


async def test_a_gpu_fault_leaves_the_xid_in_the_evidence(dpsup: Harness, tmp_path: Path) -> None:
    fake = FakeNvml(gpus=2)
    evidence = tmp_path / "evidence"
    deployment = await dpsup.start(
        2, nvml=fake.factory, gpus_per_rank=1, gpu_interval=0.1, evidence_dir=str(evidence)
    )
    fake.xid(fake.gpus[1].uuid, 79)
    with trio.fail_after(20):
        assert await deployment.wait_exit() == 1
    assert isinstance(await deployment.failure(), GpuFailed)
    folder = the_folder(evidence)
    assert folder.name.endswith("-rank1")
    events = json.loads((folder / "xid.json").read_text())
    assert [(e["gpu"], e["xid"]) for e in events] == [(fake.gpus[1].uuid, 79)]
    entry = json.loads((folder / "status.json").read_text())
    assert [g["uuid"] for g in entry["gpus"]] == [fake.gpus[1].uuid]


async def test_only_the_newest_evidence_is_kept(dpsup: Harness, tmp_path: Path) -> None:
    # Three folders of an earlier run, and what else a directory may hold: with
    # --evidence-keep 2, the new failure's folder and the newest old one are left, oldest
    # removed first whatever the run; a name not of our shape is never touched.
    evidence = tmp_path / "evidence"
    old = evidence / "0123456789abcdef"
    old.mkdir(parents=True, mode=0o700)
    for stamp in ("20260101T000000.000Z", "20260102T000000.000Z", "20260103T000000.000Z"):
        (old / f"{stamp}-rank0").mkdir(mode=0o700)
        (old / f"{stamp}-rank0" / "cause.txt").write_text("old\n")
    (evidence / "notes").mkdir()
    deployment = await dpsup.start(1, **stall_settings(evidence, evidence_keep=2))
    await deployment.stall(0)
    with trio.fail_after(20):
        assert await deployment.wait_exit() == 1
    left = sorted(p.relative_to(evidence).as_posix() for p in evidence.glob("*/*-rank*"))
    assert len(left) == 2, left
    assert left[0] == "0123456789abcdef/20260103T000000.000Z-rank0"
    assert left[1].startswith(f"{deployment.run_id}/")
    assert (evidence / "notes").is_dir()


async def stuck_capture(
    dpsup: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Deployment, int]:
    """A rank failed while its evidence is being taken by a native-stack tool that hangs and
    ignores SIGTERM, as a debugger stuck on a process in D state does; the deployment, and
    that tool's pid once it runs."""
    tools, pid_file = tmp_path / "bin", tmp_path / "debugger.pid"
    tools.mkdir()
    stuck = tools / "eu-stack"
    stuck.write_text(f"#!/bin/sh\ntrap '' TERM\necho $$ > {pid_file}\nexec sleep 600\n")
    stuck.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    # A shell stays in the rank's tree as a process that is not Python: its stacks are
    # eu-stack's to take.
    rank = f"{sys.executable} -m trio_dpsup.testing.fake_rank --port {{port}} & wait"
    deployment = await dpsup.start(
        1, form=Form.CLI, command=["sh", "-c", rank], evidence_dir=str(tmp_path / "evidence"),
        evidence_timeout=120.0,
    )  # fmt: skip
    port = (await deployment.status()).ranks[0].port
    await inject_fault(port, Fault.hang())
    with trio.fail_after(30):
        while not pid_file.exists() or not pid_file.read_text().strip():  # noqa: ASYNC110
            await trio.sleep(0.05)  # the stuck debugger writes it once it runs
    return deployment, int(pid_file.read_text())


async def test_a_hung_debugger_dies_with_a_killed_supervisor(
    dpsup: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The supervisor is SIGKILLed while it waits for the stuck debugger: the debugger is a
    # member of the rank's tree (its cookie), so the guardian kills it with the rest.
    deployment, debugger = await stuck_capture(dpsup, tmp_path, monkeypatch)
    assert alive(debugger)
    deployment.signal_supervisor(signal.SIGKILL)
    await deployment.wait_exit()
    assert await wait_pids_gone([debugger], 10.0) == [], "the hung debugger outlived it"


async def test_a_second_signal_cuts_a_hung_capture_short(
    dpsup: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second SIGTERM while the capture waits for the stuck debugger: the supervisor exits
    # at once (f2fe13b waited out the evidence timeout, 29.6 s measured).
    deployment, debugger = await stuck_capture(dpsup, tmp_path, monkeypatch)
    deployment.signal_supervisor(signal.SIGTERM)
    await deployment.signal_supervisor_again(signal.SIGTERM)
    with trio.fail_after(15):  # not the 120 s of --evidence-timeout
        assert await deployment.wait_exit() == 1  # the rank's failure
    assert await wait_pids_gone([debugger], 10.0) == []
