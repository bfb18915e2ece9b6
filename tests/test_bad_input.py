"""The validation holes an adversary found: each is exit status 2, one line naming the fix,
no traceback, and no rank started."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
from pathlib import Path

import httpx
import pytest

from trio_dpsup.testing import FAKE_RANK, free_port_range, open_cli_supervisor, run_cli

from .conftest import bare_environment, cli_args, rank_command


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{}", "{} in the command is an empty placeholder"),
        ("{port", "has a brace that is no placeholder"),
        ("port}", "has a brace that is no placeholder"),
        ("{port!r}", "has a brace that is no placeholder"),
        ("{port:d}", "has a brace that is no placeholder"),
    ],
)
async def test_malformed_placeholders(tmp_path: Path, template: str, message: str) -> None:
    pid_file = tmp_path / "pids"
    command = [*FAKE_RANK, "--port", template, "--pid-file", str(pid_file)]
    status, _, stderr = await run_cli(["--ranks", "1", "--gpus-per-rank", "0", "--", *command])
    assert status == 2
    assert stderr.startswith("trio-dpsup: error: ")
    assert message in stderr
    assert "Traceback" not in stderr
    assert not pid_file.exists()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("host = 5", "host must be a string"),
        ('host = ["a", "b"]', "host must be a string"),
        (f'host = "{"x" * 100_000}"', "host must be a string of at most 4096 characters"),
        (f'host = "{"x" * 10_000_000}"', "is larger than 1048576 bytes: not a config"),
        ("ssl-certfile = 1", "ssl-certfile must be a string"),
        ("devices = {a = 1}", "devices must be a list"),
        ("secret-option = 3", "secret-option must be a list of strings"),
        # TOML has numbers: a number in quotes is a string, and refused.
        ('base-port = "8000"', "base-port must be a whole number, not the string '8000'"),
        ('grace-period = "20"', "grace-period must be a number of seconds, not the string"),
        ('version = "1"', "unknown key 'version'"),
    ],
)
async def test_config_values_of_the_wrong_type(tmp_path: Path, toml: str, message: str) -> None:
    pid_file = tmp_path / "pids"
    config = tmp_path / "node.toml"
    config.write_text(f"ranks = 1\ngpus-per-rank = 0\n{toml}\n")
    status, _, stderr = await run_cli(["--config", str(config), "--", *rank_command(pid_file)])
    assert status == 2
    assert message in stderr
    assert "Traceback" not in stderr
    assert len(stderr) < 2000  # the 10 MB value is not repeated back
    assert not pid_file.exists()


async def test_config_that_never_ends(tmp_path: Path) -> None:
    status, _, stderr = await run_cli(["--config", "/dev/zero", "--", *FAKE_RANK])
    assert status == 2
    assert "/dev/zero is not a regular file" in stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--ranks", "1", "--health-path", "/h\r\nX: 1"], "no spaces or control characters"),
        (["--ranks", "1", "--health-path", "/h x"], "no spaces or control characters"),
        (["--ranks", "70000"], "70000 ranks need 70000 ports, more than there are"),
        (["--ranks", "3000", "--base-port", "20000", "--control-port", "0"], "open files"),
        (["--ranks", "1", "--log-dir", "/dev/null"], "--log-dir /dev/null: cannot write in"),
        (["--ranks", "1", "--log-max-bytes", "0"], "--log-max-bytes must be 1 or more"),
        (
            ["--ranks", "1", "--log-dir", "logs", "--no-log-prefix"],
            "--log-dir needs the ranks' lines to pass through the supervisor",
        ),
    ],
)
async def test_bad_values(tmp_path: Path, options: list[str], message: str) -> None:
    pid_file = tmp_path / "pids"
    env = bare_environment()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limited = ["prlimit", "--nofile=1024:1024", "--"] if "3000" in options else []
    if limited and shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    args = [*options, "--gpus-per-rank", "0", "--", *rank_command(pid_file)]
    status, _, stderr = await run_cli(args, env=env, prefix=limited)
    assert status == 2, stderr
    assert message in stderr
    assert "-9999" not in stderr
    assert not pid_file.exists()
    assert (soft, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)


async def test_a_directory_is_not_a_command(tmp_path: Path) -> None:
    status, _, stderr = await run_cli(["--ranks", "1", "--gpus-per-rank", "0", "--", str(tmp_path)])
    assert status == 2
    assert "is a directory: give the path of the server program" in stderr


async def test_empty_cuda_visible_devices_names_the_variable(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    env = {**bare_environment(), "CUDA_VISIBLE_DEVICES": ""}
    status, _, stderr = await run_cli(["--", *rank_command(pid_file)], env=env)
    assert status == 2
    assert "CUDA_VISIBLE_DEVICES=''" in stderr
    assert "--gpus-per-rank 0" in stderr
    assert not pid_file.exists()


async def test_a_huge_rank_number_in_a_path_is_not_found() -> None:
    base = free_port_range(1)
    async with open_cli_supervisor(cli_args(1, base)) as sup:
        url = await sup.wait_ready()
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.get(f"/ranks/{'9' * 5000}/ready")  # past int()'s 4300 digits
            assert response.status_code == 404
            assert (await client.get("/livez")).status_code == 200
        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 0


async def test_a_rank_that_exits_2_is_no_usage_error() -> None:
    # 2 is ours: bad input, nothing started. A rank's own 2 becomes 1, its cause names the 2.
    base = free_port_range(1)
    rank_args = ["--exit-after", "0.3", "--exit-code", "2"]
    async with open_cli_supervisor(cli_args(1, base, rank_args=rank_args)) as sup:
        assert await sup.wait() == 1
    assert "rank 0 exited unexpectedly: exit status 2" in sup.log


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("missing/status.json", "cannot write in"),
        (".", "is a directory: give a file path"),
    ],
)
async def test_status_file_that_cannot_be_written(tmp_path: Path, where: str, message: str) -> None:
    pid_file = tmp_path / "pids"
    target = tmp_path / where
    args = ["--ranks", "1", "--gpus-per-rank", "0", "--status-file", str(target)]
    status, _, stderr = await run_cli([*args, "--", *rank_command(pid_file)])
    assert status == 2
    assert f"--status-file {target}" in stderr
    assert message in stderr
    assert not pid_file.exists()


async def test_status_file_holds_the_final_status(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    command = [*FAKE_RANK, "--port", "{port}", "--exit-after", "0.5", "--exit-code", "5"]
    args = ["--ranks", "2", "--gpus-per-rank", "0", "--control-port", "0"]
    args += ["--base-port", str(free_port_range(2)), "--status-file", str(target)]
    status, _, _ = await run_cli([*args, "--", *command])
    assert status == 5
    document = json.loads(target.read_text())
    assert document["state"] == "stopped"
    assert document["failure_detail"]["type"] == "RankExited"
    assert document["failure_detail"]["returncode"] == 5
    assert [r["state"] for r in document["ranks"]] in (["failed", "stopped"], ["stopped", "failed"])
    assert os.listdir(tmp_path) == ["status.json"], "the partial file is renamed, not left"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--router", "envoy=http://127.0.0.1:1"],
            "unknown router kind 'envoy'; the kinds are: sglang",
        ),
        (["--router", "http://127.0.0.1:1"], "has no '=': write --router KIND=URL"),
        (["--router", "sglang=ftp://127.0.0.1:1"], "the router's URL must be http:// or https://"),
        (["--router", "sglang=127.0.0.1:30000"], "the router's URL must be http:// or https://"),
        (["--router", "sglang=http://127.0.0.1:x"], "Port could not be cast"),
        (["--router", "sglang=http://127.0.0.1:1/v1"], "without a path"),
        (
            ["--router", "sglang=http://127.0.0.1:1", "--router", "sglang=http://127.0.0.1:1/"],
            "--router sglang=http://127.0.0.1:1 is given twice",
        ),
        (["--drain-timeout", "-1"], "--drain-timeout must be 0 or more seconds"),
        (["--drain-delay", "-0.5"], "--drain-delay must be 0 or more seconds"),
        (["--router-timeout", "0"], "--router-timeout must be more than 0 seconds"),
        (
            ["--host", "0.0.0.0", "--router", "sglang=http://10.0.0.5:30000"],
            "is a wildcard: pass --advertise-host",
        ),
        (["--advertise-host", "0.0.0.0"], "--advertise-host '0.0.0.0' is not an address"),
        # Every interval has a floor: 1e-9 would spend a whole core on checking.
        (["--probe-interval", "1e-9"], "--probe-interval must be at least 0.01 seconds"),
        (["--tree-watch-interval", "1e-9"], "--tree-watch-interval must be at least 0.01"),
        (["--suspect-interval", "0.001"], "--suspect-interval must be at least 0.01"),
        (["--progress-interval", "1e-9"], "--progress-interval must be at least 0.01"),
        (["--gpu-interval", "1e-9"], "--gpu-interval must be at least 0.01"),
        (["--progress-log-interval", "1e-9"], "--progress-log-interval must be at least 0.01"),
    ],
)
async def test_router_drain_and_interval_options(
    tmp_path: Path, options: list[str], message: str
) -> None:
    pid_file = tmp_path / "pids"
    command = [*FAKE_RANK, "--port", "{port}", "--pid-file", str(pid_file)]
    argv = ["--ranks", "1", "--gpus-per-rank", "0", *options, "--", *command]
    status, _, stderr = await run_cli(argv)
    assert status == 2, stderr
    assert message in stderr
    assert stderr.count("\n") == 1
    assert not pid_file.exists()


async def test_a_router_at_a_rank_port_is_refused(tmp_path: Path) -> None:
    base = free_port_range(2)
    pid_file = tmp_path / "pids"
    command = [*FAKE_RANK, "--port", "{port}", "--pid-file", str(pid_file)]
    options = ["--base-port", str(base), "--router", f"sglang=http://127.0.0.1:{base + 1}"]
    argv = ["--ranks", "2", "--gpus-per-rank", "0", *options, "--", *command]
    status, _, stderr = await run_cli(argv)
    assert status == 2
    assert f"port {base + 1} is a rank's (the rank ports are {base}-{base + 1})" in stderr
    assert not pid_file.exists()
