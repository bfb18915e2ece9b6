"""Hang detection by progress: a busy rank whose progress counter stops has stalled, an idle
one never has, and one whose metrics cannot be read is reported, not failed."""

from __future__ import annotations

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_dpsup import (
    ConfigError,
    Preset,
    RankStalled,
    RankState,
    SupervisorConfig,
    SupervisorState,
)

# The pure parts of the progress check (the metrics parser, the stall clock), on purpose.
from trio_dpsup._ranks.progress import (
    WARMUP_GAPS,
    WARMUP_SECONDS,
    LearnedLimit,
    StallClock,
    metric_sums,
    parse_progress,
)
from trio_dpsup.testing import (
    Fault,
    Form,
    Harness,
    SupervisorSettings,
    free_port_range,
    inject_fault,
    open_cli_supervisor,
    run_cli,
)
from trio_dpsup.testing.fake_rank import METRIC_NAMES

from .conftest import FORMS, cli_args, on_failure

pytest_plugins = ["trio_dpsup.testing.plugin"]

BUSY, TOKENS = METRIC_NAMES["fake"]
#: Read every 0.1 s; busy without progress for 0.6 s is a stall.
PROGRESS: SupervisorSettings = {
    "progress_timeout": 0.6,
    "progress_interval": 0.1,
    "progress_busy_metric": BUSY,
    "progress_metric": TOKENS,
}


# -- the pure parts -------------------------------------------------------------------------


def test_parse_sums_label_sets_and_names_what_is_missing() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0"} 2.0\n'
        'vllm:num_requests_running{engine="1"} 1.0\n'
        "# TYPE vllm:generation_tokens counter\n"
        'vllm:generation_tokens_total{engine="0"} 100.0\n'
        'vllm:generation_tokens_total{engine="1"} 23.0\n'
    )
    busy, progress = METRIC_NAMES["vllm"]
    assert parse_progress(text, busy, progress) == (3.0, 123.0)
    with pytest.raises(ValueError, match="no sglang:num_running_reqs in the rank's metrics"):
        parse_progress(text, "sglang:num_running_reqs", progress)


def test_the_stall_clock_runs_only_while_busy_without_progress() -> None:
    clock = StallClock()
    assert clock.observe(0.0, busy=1, progress=10) == 0.0
    assert clock.observe(1.0, busy=1, progress=10) == 1.0  # busy, unmoved
    assert clock.observe(2.0, busy=1, progress=11) == 0.0  # it moved
    assert clock.observe(3.0, busy=1, progress=11) == 1.0
    assert clock.observe(4.0, busy=0, progress=11) == 0.0  # idle: never stalled
    assert clock.observe(9.0, busy=0, progress=11) == 0.0
    assert clock.observe(10.0, busy=2, progress=11) == 1.0  # busy again, from the last idle


# -- real ranks -----------------------------------------------------------------------------


@FORMS
async def test_a_rank_busy_without_progress_has_stalled(dpsup: Harness, form: Form) -> None:
    deployment = await dpsup.start(2, form=form, **PROGRESS)
    await deployment.make_busy(1, 3)
    # Busy and progressing: readings advance the counter, so the clock never reaches 0.6 s.
    with trio.fail_after(10):
        await deployment.wait_for_status(
            lambda s: (p := s.ranks[1].progress) is not None and (p.progress or 0) >= 3,
            "progress readings",
        )
    await deployment.inject(1, Fault.stall())
    with trio.fail_after(10):
        assert await deployment.wait_exit() == 1
    failure = await deployment.failure()
    assert isinstance(failure, RankStalled)
    assert (failure.rank, failure.busy_metric, failure.busy) == (1, BUSY, 3.0)
    assert failure.progress_metric == TOKENS
    assert 0.6 <= failure.seconds < 0.6 + 1.0
    assert str(failure).startswith(f"rank 1 stalled: {BUSY} = 3 but {TOKENS} stayed at ")
    await deployment.assert_no_leftovers()


async def test_an_idle_rank_without_progress_never_stalls(dpsup: Harness) -> None:
    deployment = await dpsup.start(1, **PROGRESS)
    with trio.fail_after(10):
        await deployment.wait_for_status(
            lambda s: s.ranks[0].progress is not None, "a progress reading"
        )
    await trio.sleep(3 * 0.6)  # the idle period under test: three progress timeouts
    status = await deployment.status()
    assert status.state is SupervisorState.READY
    progress = status.ranks[0].progress
    assert progress is not None
    assert (progress.busy, progress.progress, progress.stalled_for) == (0.0, 0.0, 0.0)


async def test_unreadable_metrics_are_reported_not_failed(dpsup: Harness) -> None:
    deployment = await dpsup.start(1, **PROGRESS)
    await deployment.make_busy(0)
    await deployment.fail_metrics(0, 500)
    with trio.fail_after(10):
        status = await deployment.wait_for_status(
            lambda s: (p := s.ranks[0].progress) is not None and p.problem is not None,
            "the problem in /status",
        )
    progress = status.ranks[0].progress
    assert progress is not None
    assert progress.problem is not None
    assert progress.problem.startswith("cannot read /metrics: ")
    assert "500" in progress.problem
    await trio.sleep(3 * 0.6)  # the period under test: no stall is declared on no evidence
    after = await deployment.status()
    assert after.state is SupervisorState.READY
    assert after.ranks[0].state is RankState.READY


async def test_a_stalled_rank_is_restarted_under_on_failure(dpsup: Harness) -> None:
    deployment = await dpsup.start(1, **on_failure(0.1, **PROGRESS))
    await deployment.stall(0)
    with trio.fail_after(20):
        status = await deployment.wait_for_status(
            lambda s: s.ranks[0].restarts == 1 and s.ranks[0].state is RankState.READY,
            "rank 0 restarted and ready",
        )
    (cause,) = status.ranks[0].last_causes
    assert isinstance(cause, RankStalled)
    assert status.ranks[0].progress is None or status.ranks[0].progress.busy == 0.0


# -- presets and configuration --------------------------------------------------------------


def test_the_presets_name_the_servers_metrics() -> None:
    command = ("vllm", "serve", "m")
    vllm = SupervisorConfig(command=command, preset=Preset.VLLM, progress_timeout=30)
    assert (vllm.progress_busy_metric, vllm.progress_metric) == METRIC_NAMES["vllm"]
    sglang = SupervisorConfig(command=command, preset=Preset.SGLANG, progress_timeout=30)
    assert (sglang.progress_busy_metric, sglang.progress_metric) == METRIC_NAMES["sglang"]
    mine = SupervisorConfig(
        command=command, preset=Preset.VLLM, progress_timeout=30, progress_metric="x_total"
    )
    assert mine.progress_metric == "x_total"  # a name given wins over the preset's


def test_progress_needs_its_metrics_named() -> None:
    with pytest.raises(ConfigError, match="--progress-timeout needs --progress-busy-metric"):
        SupervisorConfig(command=("server",), progress_timeout=30)
    with pytest.raises(ConfigError, match="--metrics-path must start with '/'"):
        SupervisorConfig(command=("server",), metrics_path="metrics")


async def test_vllm_preset_detects_a_stall_with_vllms_names(fake_env: dict[str, str]) -> None:
    base = free_port_range(1)
    args = [
        "--preset", "vllm", "--ranks", "1", "--gpus-per-rank", "0", "--base-port", str(base),
        "--control-port", "0", "--progress-timeout", "0.6", "--progress-interval", "0.1",
        "--", "vllm", "serve", "my-model",
    ]  # fmt: skip
    async with open_cli_supervisor(args, env=fake_env) as sup:
        await sup.wait_ready()
        for fault in (Fault.busy_with(1), Fault.stall()):
            await inject_fault(base, fault)
        with trio.fail_after(10):
            assert await sup.wait() == 1
    assert "rank 0 stalled: vllm:num_requests_running = 1 but vllm:generation_tokens_total" in (
        sup.log
    )


async def test_sglang_preset_needs_enable_metrics(fake_env: dict[str, str]) -> None:
    args = [
        "--preset", "sglang", "--ranks", "1", "--gpus-per-rank", "0",
        "--progress-timeout", "30", "--", "python", "-m", "sglang.launch_server",
    ]  # fmt: skip
    async with open_cli_supervisor(args, env=fake_env) as sup:
        assert await sup.wait() == 2
    assert "SGLang serves /metrics only with --enable-metrics: add it" in sup.log


# -- the limit learned per rank (--progress-timeout auto) -----------------------------------


def test_the_learned_limit_warms_up_then_takes_three_times_the_99th_percentile() -> None:
    learned = LearnedLimit(low=1.0, high=300.0)
    assert learned.limit() == WARMUP_SECONDS  # no gap seen yet
    for _ in range(WARMUP_GAPS - 1):
        learned.add(5.0)
    assert learned.limit() == WARMUP_SECONDS  # one short of learning
    learned.add(5.0)
    assert learned.limit() == 15.0
    for _ in range(2):  # two long prefills among 22 gaps: above the 99th percentile's rank
        learned.add(40.0)
    assert learned.limit() == 120.0
    assert LearnedLimit(low=30.0, high=300.0).limit() == WARMUP_SECONDS
    assert LearnedLimit(low=200.0, high=300.0).limit() == 200.0  # warm-up within the bounds
    capped = LearnedLimit(low=1.0, high=50.0)
    for _ in range(WARMUP_GAPS):
        capped.add(40.0)
    assert capped.limit() == 50.0


def test_the_stall_clock_measures_gaps_only_while_busy() -> None:
    clock = StallClock()
    clock.observe(0.0, busy=0, progress=1)
    assert clock.gap is None
    clock.observe(1.0, busy=1, progress=1)
    assert clock.gap is None  # busy now, not moved
    clock.observe(3.0, busy=1, progress=2)
    assert clock.gap == 3.0  # since the last idle reading
    clock.observe(4.0, busy=1, progress=5)
    assert clock.gap == 1.0
    clock.observe(6.0, busy=0, progress=6)
    assert clock.gap is None  # it went idle: no gap of a busy spell


def test_auto_is_the_default_where_the_metrics_are_known() -> None:
    llama = SupervisorConfig(command=("llama-server", "-m", "m"), preset=Preset.LLAMA_CPP)
    assert (llama.progress_on, llama.progress_learned) == (True, True)
    assert (llama.progress_timeout_min, llama.progress_timeout_max) == (30.0, 600.0)
    assert not SupervisorConfig(command=("server",)).progress_on
    named = SupervisorConfig(command=("server",), progress_busy_metric=BUSY, progress_metric=TOKENS)
    assert named.progress_learned
    sglang = ("python", "-m", "sglang.launch_server")
    assert not SupervisorConfig(command=sglang, preset=Preset.SGLANG).progress_on
    fixed = SupervisorConfig(command=("llama-server",), preset=Preset.LLAMA_CPP, progress_timeout=9)
    assert (fixed.progress_on, fixed.progress_learned) == (True, False)
    off = SupervisorConfig(command=("llama-server",), preset=Preset.LLAMA_CPP, progress_timeout=0)
    assert not off.progress_on


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"progress_timeout_min": 60.0, "progress_timeout_max": 30.0},
            "--progress-timeout-min 60 is above --progress-timeout-max 30: lower it",
        ),
        ({"progress_timeout_min": 0.0}, "--progress-timeout-min must be more than 0 seconds"),
        ({"progress_timeout_max": -1.0}, "--progress-timeout-max must be more than 0 seconds"),
        ({"progress_timeout": -1.0}, "--progress-timeout must be 0 or more seconds"),
    ],
)
def test_bad_progress_limits_name_the_fix(settings: SupervisorSettings, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SupervisorConfig(command=("server",), **settings)


async def test_auto_is_spelt_on_the_command_line_and_bad_values_exit_2() -> None:
    base = free_port_range(1)
    status, _, stderr = await run_cli(cli_args(1, base, options=["--progress-timeout", "soon"]))
    assert status == 2
    assert "give a number of seconds or auto, not 'soon'" in stderr
    status, _, stderr = await run_cli(
        cli_args(1, base, options=["--progress-timeout-min", "9", "--progress-timeout-max", "3"])
    )
    assert status == 2
    assert "--progress-timeout-min 9 is above --progress-timeout-max 3: lower it" in stderr


@FORMS
async def test_a_learned_limit_shows_and_catches_a_stall(dpsup: Harness, form: Form) -> None:
    learning: SupervisorSettings = {
        **PROGRESS,
        "progress_timeout": None,  # auto
        "progress_timeout_min": 0.5,
        "progress_timeout_max": 5.0,
    }
    deployment = await dpsup.start(1, form=form, **learning)
    await deployment.make_busy(0, 1)
    with trio.fail_after(10):
        # Warm-up: 5 s (120 s within the bounds); then 3 x 0.1 s gaps, raised to the floor.
        status = await deployment.wait_for_status(
            lambda s: (p := s.ranks[0].progress) is not None and p.gaps >= 20,
            "twenty gaps seen",
        )
    progress = status.ranks[0].progress
    assert progress is not None
    assert progress.limit == 0.5
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        metrics = (await client.get(f"{deployment.control_url}/metrics")).text
    assert 'trio_dpsup_progress_limit_seconds{rank="0"} 0.5' in metrics
    await deployment.stall(0)
    with trio.fail_after(10):
        assert await deployment.wait_exit() == 1
    failure = await deployment.failure()
    assert isinstance(failure, RankStalled)
    assert 0.5 <= failure.seconds < 0.5 + 1.0


async def test_a_restarted_rank_keeps_the_limit_it_learned(dpsup: Harness) -> None:
    learning: SupervisorSettings = {
        **PROGRESS,
        "progress_timeout": None,  # auto
        "progress_timeout_min": 0.5,
        "progress_timeout_max": 5.0,
    }
    deployment = await dpsup.start(1, **on_failure(0.1, **learning))
    await deployment.make_busy(0, 1)
    with trio.fail_after(10):
        await deployment.wait_for_status(
            lambda s: (p := s.ranks[0].progress) is not None and p.gaps >= 20,
            "twenty gaps seen",
        )
    await deployment.crash_rank(0)
    with trio.fail_after(30):
        # Its next process: ready, read, and held to the limit learned before, not warm-up.
        status = await deployment.wait_for_status(
            lambda s: (
                s.ranks[0].restarts == 1
                and (p := s.ranks[0].progress) is not None
                and p.problem is None
                and p.busy == 0
            ),
            "the restarted rank read",
        )
    progress = status.ranks[0].progress
    assert progress is not None
    assert progress.gaps >= 20
    assert progress.limit == 0.5


PAGES = [
    # The fake rank's, vLLM's (labels by model and engine, a histogram), odd but legal lines.
    '# TYPE fake:requests_running gauge\nfake:requests_running{model_name="fake"} 2.0\n'
    '# TYPE fake:tokens counter\nfake:tokens_total{model_name="fake"} 17.0\n',
    "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
    "# TYPE vllm:num_requests_running gauge\n"
    'vllm:num_requests_running{engine="0",model_name="a b } c"} 3.0\n'
    'vllm:num_requests_running{engine="1",model_name="a b } c"} 1.0\n'
    "# TYPE vllm:generation_tokens counter\n"
    'vllm:generation_tokens_total{engine="0",model_name="m"} 1.5e3\n'
    'vllm:generation_tokens_total{engine="1",model_name="m"} 12 1700000000000\n'
    "# TYPE vllm:e2e_request_latency_seconds histogram\n"
    'vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 4.0\n'
    'vllm:e2e_request_latency_seconds_count{model_name="m"} 4.0\n'
    'vllm:e2e_request_latency_seconds_sum{model_name="m"} 2.5\n',
    "# TYPE up gauge\nup 1\n# TYPE x_total counter\nx_total   +Inf\n",
]
WANTED = [
    ("fake:requests_running", "fake:tokens_total"),
    ("vllm:num_requests_running", "vllm:generation_tokens_total"),
    ("vllm:e2e_request_latency_seconds_count", "vllm:e2e_request_latency_seconds_sum"),
    ("up", "x_total"),
]


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("names", WANTED)
def test_the_metrics_scan_sums_as_prometheus_clients_parser(
    page: str, names: tuple[str, str]
) -> None:
    expected: dict[str, float] = dict.fromkeys(names, 0.0)
    seen = set()
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name in expected:
                expected[sample.name] += sample.value
                seen.add(sample.name)
    if seen != set(names):
        with pytest.raises(ValueError, match="in the rank's metrics"):
            metric_sums(page, names)
    else:
        assert metric_sums(page, names) == expected
