"""The canary: an idle rank gets a one-token generation every --canary-idle, a busy one
never does; a generation that hangs or fails twice in a row fails the rank, one failure
does not; a first canary refused (401/403/404/405) turns canaries off for that rank."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from trio_dpsup import (
    ConfigError,
    GenerationFailed,
    Preset,
    RankState,
    SupervisorConfig,
    SupervisorState,
)

# The CLI's parser and the file reader, to hold both spellings of --canary/--no-canary.
from trio_dpsup._cli import build_parser
from trio_dpsup._config.canary import not_generating, preset_canary

# The pure parts of the canary (the request per preset, the key, the idle clock), on purpose.
from trio_dpsup._config.concerns import CanarySettings, ProgressSettings, derive
from trio_dpsup._config.file import load_config_file
from trio_dpsup._ranks.canary import IdleClock, api_key
from trio_dpsup._ranks.readings import reading_interval
from trio_dpsup.testing import Fault, Form, Harness, SupervisorSettings, run_cli
from trio_dpsup.testing.fake_rank import METRIC_NAMES

from .conftest import FORMS, cli_args, on_failure

pytest_plugins = ["trio_dpsup.testing.plugin"]

BUSY, TOKENS = METRIC_NAMES["fake"]
IDLE, TIMEOUT = 1.0, 1.0
#: The fake rank's generation endpoint, asked for one token; idle told by the fake's gauges.
CANARY: SupervisorSettings = {
    "canary": True,
    "canary_idle": IDLE,
    "canary_timeout": TIMEOUT,
    "canary_request": (
        "POST",
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 1}),
    ),
    "progress_busy_metric": BUSY,
    "progress_metric": TOKENS,
    "progress_interval": 0.1,
}


# -- the pure parts -------------------------------------------------------------------------


def test_each_preset_has_its_request() -> None:
    llama = preset_canary(Preset.LLAMA_CPP, ["llama-server", "-m", "m.gguf"])
    assert llama is not None
    assert (llama.method, llama.path) == ("POST", "/completion")
    assert json.loads(llama.body or b"") == {"prompt": "Hello", "n_predict": 1}
    sglang = preset_canary(Preset.SGLANG, ["python", "-m", "sglang.launch_server"])
    assert sglang is not None
    assert (sglang.method, sglang.path, sglang.body) == ("GET", "/health_generate", None)
    for command, model in (
        (["vllm", "serve", "org/m", "--served-model-name", "short", "alias"], "short"),
        (["vllm", "serve", "org/m", "--served_model_name=short"], "short"),
        (["vllm", "serve", "org/m", "-tp", "2"], "org/m"),
        (["vllm", "serve", "--model", "org/m"], "org/m"),
    ):
        vllm = preset_canary(Preset.VLLM, command)
        assert vllm is not None
        assert (vllm.method, vllm.path) == ("POST", "/v1/completions")
        assert json.loads(vllm.body or b"") == {"model": model, "prompt": "Hello", "max_tokens": 1}
    assert preset_canary(Preset.VLLM, ["vllm", "serve", "--port-offset", "1"]) is None


def test_models_that_do_not_generate_are_told() -> None:
    assert not_generating(Preset.VLLM, ["vllm", "serve", "m", "--runner", "pooling"]) == (
        "--runner pooling"
    )
    assert not_generating(Preset.VLLM, ["vllm", "serve", "m", "--task=embed"]) == "--task embed"
    assert not_generating(Preset.VLLM, ["vllm", "serve", "m", "--task", "generate"]) is None
    assert not_generating(Preset.LLAMA_CPP, ["llama-server", "--embeddings"]) == "--embeddings"
    assert not_generating(Preset.SGLANG, ["x", "--is-embedding"]) == "--is-embedding"
    assert not_generating(Preset.LLAMA_CPP, ["llama-server", "-m", "m.gguf"]) is None


def test_the_key_is_the_commands_first() -> None:
    assert api_key(["llama-server", "--api-key", "a,b"]) == "a"
    assert api_key(["vllm", "serve", "--api-key=k"]) == "k"
    assert api_key(["vllm", "serve", "m"]) is None


def test_the_idle_clock_runs_only_while_idle_and_still() -> None:
    clock = IdleClock()
    assert clock.observe(0.0, busy=0, progress=5) == 0.0
    assert clock.observe(1.0, busy=0, progress=5) == 1.0
    assert clock.observe(2.0, busy=1, progress=5) == 0.0  # busy, even with the counter still
    assert clock.observe(3.0, busy=0, progress=5) == 0.0  # idle again: from now
    assert clock.observe(4.0, busy=0, progress=6) == 0.0  # it moved
    assert clock.observe(5.5, busy=0, progress=6) == 1.5


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"canary_request": ("PUT", "/x", "{}")}, "method 'PUT': give GET or POST"),
        ({"canary_request": ("POST", "x", "{}")}, "path 'x' must start with '/'"),
        ({"canary_request": ("POST", "/x", "{nope")}, "the JSON body does not parse"),
        ({"canary": True}, "--canary needs a request: pass --canary-request"),
        ({"canary_timeout": 0.0}, "--canary-timeout must be more than 0 seconds"),
        ({"canary_idle": -1.0}, "--canary-idle must be more than 0 seconds"),
    ],
)
def test_bad_canary_settings_name_the_fix(settings: SupervisorSettings, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SupervisorConfig(command=("server",), **settings)


def test_presets_turn_it_on_for_generating_models_only() -> None:
    llama = SupervisorConfig(command=("llama-server", "-m", "m"), preset=Preset.LLAMA_CPP)
    assert llama.canary_on
    assert llama.canary_busy_metrics == (
        "llamacpp:requests_processing",
        "llamacpp:requests_deferred",
    )
    assert llama.canary_progress_metric == "llamacpp:n_decode_total"
    embed = ("llama-server", "-m", "m", "--embedding")
    assert not SupervisorConfig(command=embed, preset=Preset.LLAMA_CPP).canary_on
    with pytest.raises(ConfigError, match="--embedding in the command serves a model that"):
        SupervisorConfig(command=embed, preset=Preset.LLAMA_CPP, canary=True)
    assert not SupervisorConfig(command=("server",)).canary_on  # no preset, no request
    sglang = ("python", "-m", "sglang.launch_server", "--model-path", "m")
    assert not SupervisorConfig(command=sglang, preset=Preset.SGLANG).canary_on
    assert SupervisorConfig(command=(*sglang, "--enable-metrics"), preset=Preset.SGLANG).canary_on


async def test_bad_canary_input_exits_2_with_nothing_started() -> None:
    status, _, stderr = await run_cli(
        cli_args(1, 1, options=["--canary-request", "DELETE", "/v1/completions", "{}"])
    )
    assert status == 2
    assert "--canary-request: method 'DELETE': give GET or POST" in stderr
    assert "Traceback" not in stderr
    status, _, stderr = await run_cli(cli_args(1, 1, options=["--canary"]))
    assert status == 2
    assert "pass --canary-request METHOD PATH JSON" in stderr


# -- real ranks -----------------------------------------------------------------------------


async def canaries_sent(deployment: object, rank: int, at_least: int) -> int:
    from trio_dpsup.testing import Deployment

    assert isinstance(deployment, Deployment)
    status = await deployment.wait_for_status(
        lambda s: (c := s.ranks[rank].canary) is not None and c.sent >= at_least,
        f"{at_least} canaries to rank {rank}",
    )
    canary = status.ranks[rank].canary
    assert canary is not None
    return canary.sent


@FORMS
async def test_an_idle_rank_gets_one_canary_per_idle_period(dpsup: Harness, form: Form) -> None:
    deployment = await dpsup.start(
        1, form=form, rank_args=["--served-model-name", "tiny", "--api-key", "k"], **CANARY
    )
    await deployment.wait_ready()
    began = trio.current_time()
    with trio.fail_after(10):
        await canaries_sent(deployment, 0, 3)
    took = trio.current_time() - began
    # Three idle periods, each ending in a canary: not faster (one per period), and not
    # much slower than the period plus a reading.
    assert 2 * IDLE <= took < 3 * (IDLE + 1.0)
    status = await deployment.status()
    canary = status.ranks[0].canary
    assert canary is not None
    assert canary.failed == 0
    assert canary.off is None
    assert canary.last is not None
    assert canary.last.ok
    assert canary.last.status_code == 200
    document = await deployment.status_document()
    assert document["ranks"][0]["canary"]["sent"] >= 3
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        metrics = (await client.get(f"{deployment.control_url}/metrics")).text
    assert 'trio_dpsup_canary_duration_seconds_count{rank="0"}' in metrics
    assert 'trio_dpsup_canary_off{rank="0"} 0.0' in metrics


@FORMS
async def test_a_generation_hang_is_caught_within_idle_plus_two_timeouts(
    dpsup: Harness, form: Form
) -> None:
    deployment = await dpsup.start(2, form=form, **CANARY)
    await deployment.wait_ready()
    with trio.fail_after(10):
        await canaries_sent(deployment, 1, 1)
    await deployment.inject(1, Fault.generate_hang())
    began = trio.current_time()
    with trio.fail_after(20):
        # Caught: the rank is out of traffic the moment its second canary fails.
        await deployment.wait_for_status(
            lambda s: s.ranks[1].failing or s.state is not SupervisorState.READY,
            "rank 1 caught",
        )
    took = trio.current_time() - began
    # The bound: canary-idle + 2 x canary-timeout + 1 s, from the fault.
    assert took <= IDLE + 2 * TIMEOUT + 1.0, f"caught after {took:.2f}s"
    with trio.fail_after(20):
        assert await deployment.wait_exit() == 1
    failure = await deployment.failure()
    assert isinstance(failure, GenerationFailed)
    assert (failure.rank, failure.attempts) == (1, 2)
    assert failure.last_error == f"no answer within {TIMEOUT:g}s"
    assert "rank 1 generation failed: 2 canaries in a row, last: no answer within" in str(failure)
    final = await deployment.final_status()
    assert final.root_cause is not None
    assert "generation failed: " in final.root_cause.cause
    await deployment.assert_no_leftovers()


async def test_a_busy_rank_never_gets_a_canary_even_with_its_counter_still(
    dpsup: Harness,
) -> None:
    deployment = await dpsup.start(1, **CANARY)
    await deployment.wait_ready()
    with trio.fail_after(10):
        sent = await canaries_sent(deployment, 0, 1)
    # A long prefill: busy, the counter still. A canary now would hang and fail the rank.
    await deployment.make_busy(0, 1)
    await deployment.stall(0)
    await deployment.inject(0, Fault.generate_hang())
    await trio.sleep(3 * (IDLE + TIMEOUT))  # the period under test: three canary periods
    status = await deployment.status()
    assert status.state is SupervisorState.READY
    canary = status.ranks[0].canary
    assert canary is not None
    assert canary.sent in (sent, sent + 1)  # one may have been on its way at the switch
    assert canary.failed == 0


async def test_one_failed_canary_is_confirmed_and_cleared(dpsup: Harness) -> None:
    deployment = await dpsup.start(1, **CANARY)
    await deployment.wait_ready()
    with trio.fail_after(10):
        sent = await canaries_sent(deployment, 0, 1)
    await deployment.inject(0, Fault.generate_error(500, count=1))
    with trio.fail_after(10):
        status = await deployment.wait_for_status(
            lambda s: (c := s.ranks[0].canary) is not None and c.failed == 1 and c.sent >= sent + 2,
            "a failed canary and the one that cleared it",
        )
    assert status.state is SupervisorState.READY
    assert status.ranks[0].state is RankState.READY
    canary = status.ranks[0].canary
    assert canary is not None
    assert canary.last is not None
    assert canary.last.ok


async def test_two_generation_errors_restart_the_rank_under_on_failure(dpsup: Harness) -> None:
    deployment = await dpsup.start(1, **on_failure(0.1, **CANARY))
    await deployment.wait_ready()
    await deployment.inject(0, Fault.generate_error(500, count=2))
    with trio.fail_after(20):
        status = await deployment.wait_for_status(
            lambda s: s.ranks[0].restarts == 1 and s.ranks[0].state is RankState.READY,
            "rank 0 restarted and ready",
        )
    (cause,) = status.ranks[0].last_causes
    assert isinstance(cause, GenerationFailed)
    assert cause.last_error.startswith("HTTP 500")


async def test_a_refused_first_canary_turns_canaries_off_for_that_rank(
    dpsup: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    # The server serves "other", the canary asks for "tiny": vLLM's 404, a configuration error.
    deployment = await dpsup.start(1, rank_args=["--served-model-name", "other"], **CANARY)
    await deployment.wait_ready()
    with trio.fail_after(10):
        status = await deployment.wait_for_status(
            lambda s: (c := s.ranks[0].canary) is not None and c.off is not None,
            "canaries off",
        )
    canary = status.ranks[0].canary
    assert canary is not None
    assert canary.off is not None
    assert "refused with HTTP 404" in canary.off
    assert "--served-model-name" in canary.off
    await trio.sleep(2 * (IDLE + TIMEOUT))  # the period under test: no more canaries, no failure
    after = await deployment.status()
    assert after.state is SupervisorState.READY
    assert after.ranks[0].canary == canary
    logged = [r for r in caplog.records if "canaries are off for this rank" in r.getMessage()]
    assert len(logged) == 1
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        metrics = (await client.get(f"{deployment.control_url}/metrics")).text
    assert 'trio_dpsup_canary_off{rank="0"} 1.0' in metrics


def test_the_command_line_and_the_file_spell_it_alike(tmp_path: Path) -> None:
    parser = build_parser()
    off = parser.parse_args(["--no-canary", "--canary-request", "POST", "/x", '{"a": 1}'])
    assert (off.canary, off.canary_request) == (False, ["POST", "/x", '{"a": 1}'])
    assert parser.parse_args(["--canary"]).canary is True
    assert parser.parse_args([]).canary is None
    path = tmp_path / "c.toml"
    path.write_text('no-canary = true\ncanary-request = ["GET", "/health_generate", "null"]\n')
    defaults, _ = load_config_file(str(path), parser._actions)
    assert defaults == {"canary": False, "canary_request": ("GET", "/health_generate", "null")}
    path.write_text('progress-timeout = "auto"\nprogress-timeout-max = 60\n')
    defaults, _ = load_config_file(str(path), parser._actions)
    assert defaults == {"progress_timeout": None, "progress_timeout_max": 60.0}
    assert parser.parse_args(["--progress-timeout", "auto"]).progress_timeout is None
    assert parser.parse_args(["--progress-timeout", "7"]).progress_timeout == 7.0
    path.write_text('canary-request = ["GET", "/x"]\n')
    with pytest.raises(ConfigError, match="canary-request must be a list of 3 strings"):
        load_config_file(str(path), parser._actions)


def test_after_a_canary_the_next_one_is_one_idle_period_later_with_no_read_of_its_own() -> None:
    clock = IdleClock()
    assert clock.observe(0.0, busy=0, progress=5) == 0.0
    assert clock.observe(5.0, busy=0, progress=5) == 5.0
    assert clock.observe(10.0, busy=0, progress=5) == 10.0  # due: the canary goes now
    clock.canary_sent(10.0)
    # The counter the canary moved is taken as found, and the clock runs from the canary.
    assert clock.observe(15.0, busy=0, progress=6) == 5.0
    assert clock.observe(20.0, busy=0, progress=6) == 10.0
    clock.canary_sent(20.0)
    assert clock.observe(25.0, busy=0, progress=7) == 5.0
    assert clock.observe(27.0, busy=0, progress=9) == 0.0  # work of its own since: from now
    clock.canary_sent(30.0)
    assert clock.observe(31.0, busy=1, progress=9) == 0.0  # busy: never counted


def test_readings_come_often_enough_for_the_canary_and_the_progress_check() -> None:
    config = SupervisorConfig(command=("server",), **CANARY)
    progress, canary = derive(ProgressSettings, config), derive(CanarySettings, config)
    assert reading_interval(progress, canary) == min(config.progress_interval, IDLE)
    no_canary: SupervisorSettings = {**CANARY, "canary": False}
    off = SupervisorConfig(command=("server",), **no_canary)
    assert reading_interval(derive(ProgressSettings, off), derive(CanarySettings, off)) == (
        off.progress_interval
    )
    no_progress: SupervisorSettings = {**CANARY, "progress_timeout": 0.0}
    alone = SupervisorConfig(command=("server",), **no_progress)
    assert reading_interval(derive(ProgressSettings, alone), derive(CanarySettings, alone)) == (
        alone.canary_idle
    )


async def test_the_cause_is_in_the_evidence(dpsup: Harness, tmp_path: Path) -> None:
    evidence = tmp_path / "evidence"
    settings: SupervisorSettings = {
        **CANARY,
        "evidence_dir": str(evidence),
        "evidence_timeout": 10.0,
    }
    deployment = await dpsup.start(1, **settings)
    await deployment.wait_ready()
    await deployment.inject(0, Fault.generate_hang())
    with trio.fail_after(20):
        assert await deployment.wait_exit() == 1
    (cause,) = evidence.glob("*/*-rank0/cause.txt")
    assert "rank 0 generation failed: 2 canaries in a row" in cause.read_text()
