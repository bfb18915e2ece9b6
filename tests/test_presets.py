"""--preset vllm / sglang, against fake vllm and sglang executables that record their argv."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from trio_dpsup import ConfigError, Preset, SupervisorConfig, plan_ranks
from trio_dpsup.testing import free_port_range, open_cli_supervisor
from trio_dpsup.testing.fake_servers import read_recorded_argv

from .conftest import run_cli


async def test_vllm_preset_adds_host_port_and_rank(
    fake_env: dict[str, str], tmp_path: Path
) -> None:
    base = free_port_range(2)
    args = [
        "--preset", "vllm", "--ranks", "2", "--start-rank", "2", "--gpus-per-rank", "0",
        "--base-port", str(base), "--control-port", "0", "--",
        "vllm", "serve", "my-model", "--data-parallel-size", "4", "--api-key", "sk-secret",
    ]  # fmt: skip
    async with open_cli_supervisor(args, env=fake_env) as sup:
        await sup.wait_ready()
        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 0
    recorded = sorted(read_recorded_argv(tmp_path / "argv.jsonl"), key=lambda e: str(e["argv"]))
    user = ["serve", "my-model", "--data-parallel-size", "4", "--api-key", "sk-secret"]
    assert [e["argv"] for e in recorded] == [
        [*user, "--host", "127.0.0.1", "--port", str(base + i), "--data-parallel-rank", str(2 + i)]
        for i in range(2)
    ]
    # The final command lines are printed at start, secrets redacted.
    assert (
        f"rank 3 command: vllm serve my-model --data-parallel-size 4 --api-key '***' "
        f"--host 127.0.0.1 --port {base + 1} --data-parallel-rank 3" in sup.log
    )
    assert "sk-secret" not in sup.log


async def test_sglang_preset(fake_env: dict[str, str], tmp_path: Path) -> None:
    base = free_port_range(2)
    args = [
        "--preset", "sglang", "--ranks", "2", "--gpus-per-rank", "0",
        "--base-port", str(base), "--control-port", "0", "--",
        sys.executable, "-m", "sglang.launch_server", "--model-path", "my-model", "--tp", "1",
    ]  # fmt: skip
    async with open_cli_supervisor(args, env=fake_env) as sup:
        await sup.wait_ready()
        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 0
    argvs = sorted(str(e["argv"]) for e in read_recorded_argv(tmp_path / "argv.jsonl"))
    assert argvs == [
        str(["--model-path", "my-model", "--tp", "1", "--host", "127.0.0.1", "--port", str(p)])
        for p in (base, base + 1)
    ]


def plan(preset: Preset, *command: str, **overrides: object) -> None:
    settings: dict[str, object] = {"ranks": 2, "gpus_per_rank": 1, "devices": ("0", "1")}
    settings.update(overrides)
    config = SupervisorConfig(command=(sys.executable, *command), preset=preset, **settings)  # type: ignore[arg-type]
    plan_ranks(config, {"PATH": os.environ["PATH"]})


V = ["serve", "m", "-dp", "2"]  # a vLLM command with room for two ranks
SG = ["-m", "sglang.launch_server"]


@pytest.mark.parametrize(
    ("preset", "command", "message"),
    [
        (Preset.VLLM, [*V, "--port", "8000"], "--port in the command: the supervisor gives"),
        (Preset.VLLM, [*V, "--host=0.0.0.0"], "use trio-dpsup --host"),
        (Preset.VLLM, [*V, "--data-parallel-rank=1"], "gives each rank its --data-parallel-rank"),
        (Preset.VLLM, [*V, "-dpl", "2"], "-dpl 2 makes one server span several ranks"),
        (Preset.VLLM, [*V, "--data-parallel-multi-port-external-lb"], "one server per rank"),
        (Preset.VLLM, ["serve", "m"], "do not fit in --data-parallel-size 1: pass"),
        (Preset.VLLM, ["serve", "m", "-dp", "x"], "-dp needs a whole number, not 'x'"),
        (Preset.VLLM, [*V, "-tp", "2"], "uses 2 GPU(s) (tensor x pipeline parallel size)"),
        (Preset.VLLM, [*V, "-tp", "2"], "is 1: pass --gpus-per-rank 2"),
        (Preset.SGLANG, [*SG, "--dp-size", "2"], "--dp-size 2 makes one server span"),
        (Preset.SGLANG, [*SG, "--base-gpu-id", "1"], "sets CUDA_VISIBLE_DEVICES per rank"),
        (Preset.SGLANG, [*SG, "--tp", "2", "--pp-size", "2"], "each server uses 4 GPU(s)"),
    ],
)
def test_preset_refuses_what_the_supervisor_owns(
    preset: Preset, command: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=f"--preset {preset.value}: .*{_escape(message)}"):
        plan(preset, *command)


def test_start_rank_counts_against_the_data_parallel_size() -> None:
    plan(Preset.VLLM, "serve", "m", "-dp", "4", start_rank=2)
    with pytest.raises(ConfigError, match="ranks 3-4 do not fit in --data-parallel-size 4"):
        plan(Preset.VLLM, "serve", "m", "-dp", "4", start_rank=3)


def test_tensor_parallel_ranks_get_their_gpus() -> None:
    config = SupervisorConfig(
        command=(sys.executable, "serve", "m", "-dp", "2", "-tp", "2"),
        preset=Preset.VLLM,
        gpus_per_rank=2,
        devices=("0", "1", "2", "3"),
    )
    plans = plan_ranks(config, {"PATH": os.environ["PATH"]})
    assert [dict(p.env)["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0,1", "2,3"]


async def test_cli_refusal_exits_2(fake_env: dict[str, str]) -> None:
    status, stderr = await run_cli(
        [
            "--preset",
            "vllm",
            "--ranks",
            "1",
            "--gpus-per-rank",
            "0",
            "--",
            "vllm",
            "serve",
            "m",
            "--port",
            "1",
        ],
        env=fake_env,
    )
    assert status == 2
    assert stderr.startswith("trio-dpsup: error: --preset vllm: --port in the command")


def _escape(text: str) -> str:
    return re.escape(text)
