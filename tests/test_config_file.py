"""--config FILE.toml: options as keys, the command line wins, bad keys exit 2."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from trio_dpsup.testing import FAKE_RANK, free_port_range, open_cli_supervisor, run_cli

from .conftest import bare_environment


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dpsup.toml"
    path.write_text(text)
    return path


async def test_file_options_apply_and_the_command_line_wins(tmp_path: Path) -> None:
    base = free_port_range(3)
    path = write_config(
        tmp_path,
        f"""
ranks = 3
gpus-per-rank = 0
base_port = {base}
control-port = 0
probe-interval = 0.1
no-log-prefix = true
command = {json.dumps([*FAKE_RANK, "--port", "{port}"])}
""",
    )
    async with open_cli_supervisor(["--config", str(path), "--ranks", "2"]) as sup:
        await sup.wait_ready()
        status = await sup.status()
        assert [r.port for r in status.ranks] == [base, base + 1]
        sup.send_signal(signal.SIGINT)
        assert await sup.wait() == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "rnaks = 2",
            "unknown key 'rnaks': the keys are command, admin-socket, advertise-host, base-port",
        ),
        ("ranks = 'two'", "ranks must be a whole number, not the string 'two'"),
        ("ranks = 2.5", "ranks must be a whole number, not 2.5"),
        ("grace-period = true", "grace-period must be a number of seconds, not True"),
        ("fail-on-leftovers = 1", "fail-on-leftovers must be true or false, not 1"),
        ("log-format = 'xml'", "log-format must be one of text, json, not 'xml'"),
        ("command = 'vllm serve'", "command must be a list of strings"),
        ("ranks = ", "not valid TOML"),
    ],
)
async def test_bad_files_exit_2_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write_config(tmp_path, text)
    status, _, stderr = await run_cli(["--config", str(path), "--", *FAKE_RANK, "--port", "{port}"])
    assert status == 2
    assert stderr.startswith("trio-dpsup: error: ")
    assert str(path) in stderr
    assert message in stderr


async def test_missing_file_exits_2(tmp_path: Path) -> None:
    status, _, stderr = await run_cli(["--config", str(tmp_path / "nope.toml"), "--", "true"])
    assert status == 2
    assert "No such file or directory: give the path of a TOML file" in stderr


async def test_the_example_node_toml_is_valid() -> None:
    """deploy/systemd/node.toml loads: the first error is that vllm is not installed here."""
    example = Path(__file__).parent.parent / "deploy" / "systemd" / "node.toml"
    status, _, stderr = await run_cli(
        ["--config", str(example), "--ranks", "1"], env=bare_environment()
    )
    assert status == 2
    assert "command 'vllm' is not found on PATH" in stderr
