"""Bad input through the real CLI: exit status 2, a message naming the fix, nothing started."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import trio_dpsup
from trio_dpsup import NvmlUnavailable, open_pynvml
from trio_dpsup.testing import FAKE_RANK, free_port_range, run_cli

from .conftest import bare_environment, rank_command


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port with a listener on it for the duration of the test."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


def nvml_available() -> bool:
    try:
        open_pynvml().close()
    except NvmlUnavailable:
        return False
    return True


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--ranks", "2", "--base-port", "20000", "--control-port", "20001"],
         "--control-port 20001 is inside the rank ports 20000-20001"),
        (["--ranks", "2", "--base-port", "65535"], "go past 65535"),
        (["--ranks", "1", "--control-port", "70000"], "--control-port must be within"),
        (["--ranks", "0"], "--ranks must be 1 or more"),
        (["--ranks", "1", "--gpus-per-rank", "-1"], "--gpus-per-rank must be 0 (ranks without"),
        (["--ranks", "1", "--grace-period", "-1"], "--grace-period must be more than 0"),
        (["--ranks", "1", "--probe-interval", "0"], "--probe-interval must be more than 0"),
        (["--ranks", "1", "--startup-timeout", "-5"], "--startup-timeout must be 0 or more"),
        # GPU 0 exists on any machine with a GPU: the count is what fails, everywhere.
        (["--ranks", "3", "--devices", "0"], "3 ranks x 1 GPUs per rank need 3 devices"),
        (["--devices", "0,1,0"], "device 0 is listed twice"),
    ],
)  # fmt: skip
async def test_bad_option_exits_2_and_starts_nothing(
    tmp_path: Path, options: list[str], message: str
) -> None:
    pid_file = tmp_path / "pids"
    env = bare_environment()
    status, _, stderr = await run_cli([*options, "--", *rank_command(pid_file)], env=env)
    assert status == 2
    assert message in stderr
    assert stderr.startswith("trio-dpsup: error: ")
    assert not pid_file.exists()


@pytest.mark.skipif(nvml_available(), reason="NVML finds this machine's GPUs")
async def test_no_ranks_and_no_nvml(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    env = bare_environment()
    status, _, stderr = await run_cli(["--", *rank_command(pid_file)], env=env)
    assert status == 2
    assert stderr.startswith("trio-dpsup: error: no devices are known (NVML is unavailable: ")
    assert "pass --ranks N" in stderr
    assert not pid_file.exists()


@pytest.mark.skipif(nvml_available(), reason="NVML finds this machine's GPUs")
async def test_gpu_ranks_are_never_started_unpinned(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    args = ["--ranks", "2", "--", *rank_command(pid_file)]
    status, _, stderr = await run_cli(args, env=bare_environment())
    assert status == 2
    assert "2 ranks with --gpus-per-rank 1 would each see every GPU" in stderr
    assert "--devices" in stderr
    assert "--gpus-per-rank 0" in stderr
    assert not pid_file.exists()


async def test_unknown_placeholder(tmp_path: Path) -> None:
    status, _, stderr = await run_cli(["--ranks", "1", "--", *FAKE_RANK, "--port", "{prot}"])
    assert status == 2
    assert "unknown placeholder {prot}" in stderr


async def test_command_not_found() -> None:
    status, _, stderr = await run_cli(["--ranks", "1", "--", "no-such-inference-server"])
    assert status == 2
    assert "'no-such-inference-server' is not found on PATH" in stderr


async def test_command_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "serve.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    status, _, stderr = await run_cli(["--ranks", "1", "--", str(script)])
    assert status == 2
    assert "is not executable" in stderr


async def test_no_command_after_double_dash() -> None:
    status, _, stderr = await run_cli(["--ranks", "1", "--"])
    assert status == 2
    assert "no command to run: put the rank command after '--'" in stderr


async def test_malformed_option_value() -> None:
    status, _, stderr = await run_cli(["--ranks", "two", "--", *FAKE_RANK])
    assert status == 2
    assert "invalid int value: 'two'" in stderr


async def test_control_port_taken(tmp_path: Path, taken_port: int) -> None:
    pid_file = tmp_path / "pids"
    base = free_port_range(1)
    options = ["--ranks", "1", "--base-port", str(base), "--control-port", str(taken_port)]
    status, _, stderr = await run_cli([*options, "--", *rank_command(pid_file)])
    assert status == 2
    assert f"cannot listen on --control-host 127.0.0.1 --control-port {taken_port}" in stderr
    assert "choose a free port" in stderr
    assert not pid_file.exists()


async def test_version_and_the_help_examples() -> None:
    version = await run_cli(["--version"])
    assert version.stdout.strip() == f"trio-dpsup {trio_dpsup.__version__}"
    text = (await run_cli(["--help"])).stdout
    assert "--grace-period SECONDS" in text
    assert "Examples:" in text
    assert "trio-dpsup --ranks 4 --gpus-per-rank 0 -- python -m trio_dpsup.demo" in text
