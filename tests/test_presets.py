"""--preset vllm / sglang, against fake vllm and sglang executables that record their argv."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Unpack

import pytest

from trio_dpsup import ConfigError, Preset, SupervisorConfig, plan_ranks
from trio_dpsup.testing import (
    SupervisorSettings,
    free_port_range,
    open_cli_supervisor,
    run_cli,
)
from trio_dpsup.testing.fake_servers import read_recorded_argv


async def test_vllm_preset_adds_host_port_and_rank(
    fake_env: dict[str, str], tmp_path: Path
) -> None:
    base = free_port_range(2)
    args = [
        "--preset", "vllm", "--ranks", "2", "--start-rank", "2", "--gpus-per-rank", "0",
        "--base-port", str(base), "--control-port", "0", "--",
        "vllm", "serve", "my-model", "--data-parallel-size", "4", "--api-key", "sk-secret",
        "--data-parallel-address", "10.0.0.1",
    ]  # fmt: skip
    async with open_cli_supervisor(args, env=fake_env) as sup:
        await sup.wait_ready()
        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 0
    recorded = sorted(read_recorded_argv(tmp_path / "argv.jsonl"), key=lambda e: str(e["argv"]))
    user = [
        "serve", "my-model", "--data-parallel-size", "4", "--api-key", "sk-secret",
        "--data-parallel-address", "10.0.0.1",
    ]  # fmt: skip
    assert [e["argv"] for e in recorded] == [
        [*user, "--host", "127.0.0.1", "--port", str(base + i), "--data-parallel-rank", str(2 + i)]
        for i in range(2)
    ]
    # The final command lines are printed at start, secrets redacted.
    assert (
        f"rank 3 command: vllm serve my-model --data-parallel-size 4 --api-key '***' "
        f"--data-parallel-address 10.0.0.1 --host 127.0.0.1 --port {base + 1} "
        "--data-parallel-rank 3" in sup.log
    )
    assert "sk-secret" not in sup.log
    # Ranks 0-1 of the group are another node's: said at start.
    assert "ranks 2-3 of the data-parallel group of 4 run here; the others are expected" in sup.log


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


def plan(preset: Preset, /, *command: str, **overrides: Unpack[SupervisorSettings]) -> None:
    settings: SupervisorSettings = {
        "preset": preset,
        "gpus_per_rank": 1,
        "devices": ("0", "1"),
        **overrides,
    }
    config = SupervisorConfig(command=(sys.executable, *command), ranks=2, **settings)
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
        (Preset.VLLM, [*V, "-dpl=2"], "drop it and pass trio-dpsup --ranks 2"),
        (Preset.VLLM, [*V, "--data-parallel-multi-port-external-lb"], "one server per rank"),
        # vLLM's short forms are refused as their long forms, named as written.
        (Preset.VLLM, [*V, "-dpn", "1"], "-dpn (--data-parallel-rank) in the command: the"),
        (Preset.VLLM, [*V, "-dpn=1"], "-dpn (--data-parallel-rank) in the command"),
        (Preset.VLLM, [*V, "--data_parallel_rank=1"], "(--data-parallel-rank) in the command"),
        (
            Preset.VLLM,
            [*V, "-dpr", "4"],
            "-dpr (--data-parallel-start-rank) in the command: use trio-dpsup --start-rank",
        ),
        (
            Preset.VLLM,
            [*V, "-dph"],
            "-dph (--data-parallel-hybrid-lb) in the command: the "
            "supervisor runs one server per rank",
        ),
        (Preset.VLLM, [*V, "-dpm"], "-dpm (--data-parallel-multi-port-external-lb)"),
        (Preset.VLLM, [*V, "--headless"], "--headless in the command: a headless server serves"),
        (Preset.VLLM, ["serve", "m", "-dp=3", "-dpl", "3"], "-dpl 3 makes one server span"),
        (Preset.VLLM, ["serve", "m", "-dp", "x"], "-dp needs a whole number, not 'x'"),
        (Preset.VLLM, [*V, "-tp", "2"], "uses 2 GPU(s) (tensor x pipeline parallel size)"),
        (Preset.VLLM, [*V, "-tp", "2"], "is 1: pass --gpus-per-rank 2"),
        (Preset.SGLANG, [*SG, "--dp-size", "2"], "--dp-size 2 makes one server span"),
        (Preset.SGLANG, [*SG, "--base-gpu-id", "1"], "sets CUDA_VISIBLE_DEVICES per rank"),
        (Preset.SGLANG, [*SG, "--tp", "2", "--pp-size", "2"], "each server uses 4 GPU(s)"),
        # Every spelling of SGLang's docs (the long names too, and = forms).
        (Preset.SGLANG, [*SG, "--tensor-parallel-size", "2"], "each server uses 2 GPU(s)"),
        (Preset.SGLANG, [*SG, "--tensor-parallel-size=2"], "each server uses 2 GPU(s)"),
        (Preset.SGLANG, [*SG, "--pipeline-parallel-size", "2"], "each server uses 2 GPU(s)"),
        (Preset.SGLANG, [*SG, "--tp-size=2"], "each server uses 2 GPU(s)"),
        (Preset.SGLANG, [*SG, "--data-parallel-size", "2"], "--data-parallel-size 2 makes one"),
        (Preset.SGLANG, [*SG, "--dp=2"], "--dp 2 makes one server span"),
        (Preset.VLLM, [*V, "--uds", "/tmp/v.sock"], "--uds in the command: it makes vLLM ignore"),
        (Preset.VLLM, [*V, "--uds=/tmp/v.sock"], "--uds in the command"),
    ],
)
def test_preset_refuses_what_the_supervisor_owns(
    preset: Preset, command: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=f"--preset {preset.value}: .*{_escape(message)}"):
        plan(preset, *command)


def test_start_rank_counts_against_the_data_parallel_size() -> None:
    head = ("-dpa", "10.0.0.1")
    plan(Preset.VLLM, "serve", "m", "-dp", "4", *head, start_rank=2)
    with pytest.raises(ConfigError, match="ranks 3-4 do not fit in --data-parallel-size 4"):
        plan(Preset.VLLM, "serve", "m", "--data_parallel_size=4", *head, start_rank=3)


def test_a_second_node_needs_the_head_address() -> None:
    with pytest.raises(ConfigError, match="--start-rank 2 without --data-parallel-address"):
        plan(Preset.VLLM, "serve", "m", "-dp", "4", start_rank=2)
    plan(Preset.VLLM, "serve", "m", "-dp", "4", "--data-parallel-address=10.0.0.1", start_rank=2)


def test_without_a_data_parallel_size_ranks_are_independent_replicas() -> None:
    """vLLM: --data-parallel-rank is for MoE data parallelism; without --data-parallel-size
    the ranks are independent servers, given their host and port only."""
    config = SupervisorConfig(
        command=(sys.executable, "serve", "m", "-dpe"),  # accepted, as its long form is
        preset=Preset.VLLM, ranks=3, gpus_per_rank=1, devices=("0", "1", "2"),
    )  # fmt: skip
    plans = plan_ranks(config, {"PATH": os.environ["PATH"]})
    assert [p.argv[1:] for p in plans] == [
        ("serve", "m", "-dpe", "--host", "127.0.0.1", "--port", str(8000 + i)) for i in range(3)
    ]


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
    status, _, stderr = await run_cli(
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


def test_gpus_per_rank_comes_from_the_command_when_not_given() -> None:
    command = (sys.executable, "serve", "m", "-tp", "2", "--pipeline_parallel_size=2")
    config = SupervisorConfig(command=command, preset=Preset.VLLM, devices=tuple("01234567"))
    assert config.gpus == 4
    plans = plan_ranks(config, {"PATH": os.environ["PATH"]})
    assert [dict(p.env)["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0,1,2,3", "4,5,6,7"]
    assert SupervisorConfig(command=command).gpus == 1  # no preset: 1, as before
    sglang = SupervisorConfig(command=("x", "--tp", "2"), preset=Preset.SGLANG)
    assert sglang.gpus == 2


def test_sglang_long_names_set_the_gpus_per_rank() -> None:
    # With 4 devices and --tensor-parallel-size 2, two servers of two GPUs, not four of one.
    config = SupervisorConfig(
        command=(sys.executable, *SG, "--tensor-parallel-size", "2"), preset=Preset.SGLANG,
        devices=("0", "1", "2", "3"),
    )  # fmt: skip
    plans = plan_ranks(config, {"PATH": os.environ["PATH"]})
    assert [p.devices for p in plans] == [("0", "1"), ("2", "3")]


LLAMA = ("llama-server", "-m", "tiny.gguf", "-c", "4096")


@pytest.mark.parametrize(
    ("command", "added"),
    [
        (LLAMA, ["--host", "{host}", "--port", "{port}", "--metrics"]),
        ((*LLAMA, "--metrics"), ["--host", "{host}", "--port", "{port}"]),  # not twice
    ],
)
def test_llama_cpp_preset_adds_host_port_and_metrics(
    command: tuple[str, ...], added: list[str]
) -> None:
    from trio_dpsup._config.presets import apply_preset  # the rewrite itself, on purpose

    assert apply_preset(Preset.LLAMA_CPP, command, 1) == (*command, *added)
    # llama.cpp splits its layers over every GPU it is given: any count per rank is right.
    assert apply_preset(Preset.LLAMA_CPP, command, 2)[: len(command)] == command


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--port", "8080"], "--port in the command: the supervisor gives rank i the port"),
        (["--host=0.0.0.0"], "--host in the command: use trio-dpsup --host"),
        (["--host", "/tmp/llama.sock"], "--host in the command"),  # a UNIX socket, too
        (["--reuse-port"], "--reuse-port in the command: the supervisor gives each rank"),
        (["-dev", "CUDA1"], "-dev in the command: the supervisor pins each rank's GPUs"),
        (["--device=CUDA1"], "--device in the command: the supervisor pins"),
    ],
)
def test_llama_cpp_preset_refuses_what_the_supervisor_owns(option: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=f"--preset llama-cpp: {_escape(message)}"):
        plan(Preset.LLAMA_CPP, "-m", "tiny.gguf", *option)


def test_llama_cpp_preset_sets_the_progress_metrics() -> None:
    config = SupervisorConfig(
        command=LLAMA, preset=Preset.LLAMA_CPP, progress_timeout=30, gpus_per_rank=0
    )
    assert config.progress_busy_metric == "llamacpp:requests_processing"
    assert config.progress_metric == "llamacpp:n_decode_total"
    assert config.fail_on_status == ()  # its 503 means "Loading model", not a dead engine
