"""The rank plan and config validation: pure functions, no processes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Unpack

import pytest

from trio_dpsup import ConfigError, SupervisorConfig, plan_ranks
from trio_dpsup._output.redact import redact_argv  # the redaction unit itself, on purpose
from trio_dpsup.testing import SupervisorSettings

PY = sys.executable
ENV = {"PATH": "/usr/bin:/bin"}


def config(
    command: tuple[str, ...] = (PY, "-m", "server", "--port", "{port}"),
    ranks: int | None = 2,
    **overrides: Unpack[SupervisorSettings],
) -> SupervisorConfig:
    settings: SupervisorSettings = {
        "gpus_per_rank": 0,  # no devices are known here: GPU ranks would be refused
        "base_port": 8000,
        "control_port": 9000,
        **overrides,
    }
    return SupervisorConfig(command=command, ranks=ranks, **settings)


def test_placeholders_are_filled_per_rank() -> None:
    cfg = config(
        command=(PY, "{rank}", "{local_rank}", "{port}", "{host}", "{gpus}", "{ranks}"),
        ranks=2,
        start_rank=4,
        gpus_per_rank=2,
        devices=("0", "1", "2", "3"),
        host="0.0.0.0",
    )
    plans = plan_ranks(cfg, ENV)
    assert [p.argv[1:] for p in plans] == [
        ("4", "0", "8000", "0.0.0.0", "0,1", "2"),
        ("5", "1", "8001", "0.0.0.0", "2,3", "2"),
    ]
    assert [p.rank for p in plans] == [4, 5]
    assert [dict(p.env)["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0,1", "2,3"]


def test_json_and_escaped_braces_pass_through() -> None:
    cfg = config(command=(PY, '{"max_tokens": 8}', "{{port}}", "x{port}y"), ranks=1)
    (plan,) = plan_ranks(cfg, ENV)
    assert plan.argv[1:] == ('{"max_tokens": 8}', "{port}", "x8000y")


def test_unknown_placeholder_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown placeholder \{prot\}.*use one of"):
        plan_ranks(config(command=(PY, "--port", "{prot}")), ENV)


def test_ranks_are_never_started_unpinned() -> None:
    """With no device list, two GPU ranks would each see every GPU: refused, naming the fix."""
    with pytest.raises(ConfigError, match=r"would each see every GPU: name the devices with"):
        plan_ranks(config(gpus_per_rank=1), ENV)
    with pytest.raises(ConfigError, match=r"NVML is unavailable: no driver\).*--gpus-per-rank 0"):
        plan_ranks(config(gpus_per_rank=2), ENV, nvml_problem="no driver")
    (plan,) = plan_ranks(config(gpus_per_rank=1, ranks=1), ENV)  # one rank: started, loudly
    assert "CUDA_VISIBLE_DEVICES" not in dict(plan.env)


def test_gpus_placeholder_needs_devices() -> None:
    with pytest.raises(ConfigError, match=r"\{gpus\} is used but no devices are known"):
        plan_ranks(config(command=(PY, "{gpus}")), ENV)


def test_devices_come_from_cuda_visible_devices() -> None:
    plans = plan_ranks(config(ranks=None, gpus_per_rank=1), {**ENV, "CUDA_VISIBLE_DEVICES": "3,5"})
    assert [p.devices for p in plans] == [("3",), ("5",)]


def test_empty_cuda_visible_devices_means_no_devices() -> None:
    with pytest.raises(ConfigError, match="only 0 are available"):
        plan_ranks(config(ranks=1, gpus_per_rank=1), {**ENV, "CUDA_VISIBLE_DEVICES": ""})


def test_no_devices_and_no_ranks_asks_for_ranks() -> None:
    with pytest.raises(ConfigError, match="pass --ranks N"):
        plan_ranks(config(ranks=None), ENV)


def test_without_devices_cuda_visible_devices_is_left_alone() -> None:
    (plan,) = plan_ranks(config(ranks=1, gpus_per_rank=1), ENV)
    assert (plan.env, plan.devices) == ((), ())


def test_too_few_devices() -> None:
    with pytest.raises(ConfigError, match=r"3 ranks x 2 GPUs per rank need 6 devices.*only 4"):
        plan_ranks(config(ranks=3, gpus_per_rank=2, devices=("0", "1", "2", "3")), ENV)


def test_device_listed_twice() -> None:
    with pytest.raises(ConfigError, match="device 1 is listed twice in --devices"):
        config(devices=("0", "1", "1"))
    with pytest.raises(ConfigError, match="device 0 is listed twice in CUDA_VISIBLE_DEVICES"):
        plan_ranks(config(ranks=None), {**ENV, "CUDA_VISIBLE_DEVICES": "0,0"})


def test_control_port_inside_rank_ports() -> None:
    with pytest.raises(
        ConfigError, match=r"--control-port 8001 is inside the rank ports 8000-8001"
    ):
        config(control_port=8001)


def test_control_port_inside_rank_ports_derived_from_devices() -> None:
    cfg = config(ranks=None, gpus_per_rank=1, devices=("0", "1", "2"), control_port=8002)
    with pytest.raises(ConfigError, match="inside the rank ports 8000-8002"):
        plan_ranks(cfg, ENV)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base_port": 0}, "--base-port must be within 1-65535"),
        ({"base_port": 70000}, "--base-port must be within 1-65535"),
        ({"base_port": 65535, "ranks": 2}, "go past 65535: lower --base-port to 65534"),
        ({"control_port": -1}, "--control-port must be within"),
        ({"control_port": 65536}, "--control-port must be within"),
    ],
)
def test_ports_out_of_range(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ranks": 0}, "--ranks must be 1 or more"),
        ({"gpus_per_rank": -1}, "--gpus-per-rank must be 0 .ranks without GPUs. or more"),
        ({"failure_threshold": 0}, "--failure-threshold must be 1 or more"),
        ({"start_rank": -1}, "--start-rank must be 0 or more"),
        ({"probe_interval": 0.0}, "--probe-interval must be more than 0"),
        ({"probe_timeout": -1.0}, "--probe-timeout must be more than 0"),
        ({"grace_period": 0.0}, "--grace-period must be more than 0"),
        ({"startup_timeout": -1.0}, "--startup-timeout must be 0 or more"),
        ({"drain_delay": float("nan")}, "--drain-delay must be 0 or more"),
        ({"command": ()}, "no command to run: put the rank command after '--'"),
        ({"health_path": "health"}, "--health-path must start with '/'"),
    ],
)
def test_bad_counts_and_durations(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**overrides)


def test_command_not_found() -> None:
    with pytest.raises(ConfigError, match="'no-such-server' is not found on PATH"):
        plan_ranks(config(command=("no-such-server", "{port}")), ENV)


def test_command_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "server.sh"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(ConfigError, match="is not executable: chmod \\+x it"):
        plan_ranks(config(command=(str(script),)), ENV)


def test_command_path_missing() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        plan_ranks(config(command=("/nonexistent/server",)), ENV)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--api-key", "s3cret", "--port", "1"], ["--api-key", "***", "--port", "1"]),
        (["--api-key=s3cret"], ["--api-key=***"]),
        (["--HF-TOKEN", "t"], ["--HF-TOKEN", "***"]),
        (
            ["--db-password=p", "--client-secret", "x"],
            ["--db-password=***", "--client-secret", "***"],
        ),
        (["--apikey", "k", "--tokenizer", "t"], ["--apikey", "***", "--tokenizer", "t"]),
        (["--max-num-batched-tokens", "8192"], ["--max-num-batched-tokens", "8192"]),
        (["--api-key"], ["--api-key"]),
    ],
)
def test_secrets_are_redacted(argv: list[str], expected: list[str]) -> None:
    assert list(redact_argv(argv)) == expected
