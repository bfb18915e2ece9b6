"""A real inference engine as the ranks: llama.cpp's llama-server, with a tiny random model
written at test time. Found or built once per machine (trio_dpsup.testing.llama_cpp); where
it can be neither, every test here skips with one line saying why."""

from __future__ import annotations

import contextlib
import itertools
import signal
from pathlib import Path
from typing import Unpack

import httpx
import psutil
import pytest
import trio

from trio_dpsup import Preset, RankExited, RankStalled, RankState, RankUnhealthy
from trio_dpsup.testing import Deployment, Form, Harness, SupervisorSettings

from .conftest import llama, on_failure

pytest_plugins = ["trio_dpsup.testing.plugin"]


async def start(
    dpsup: Harness, ranks: int, command: list[str], **settings: Unpack[SupervisorSettings]
) -> Deployment:
    with_preset: SupervisorSettings = {"preset": Preset.LLAMA_CPP, **settings}
    return await dpsup.start(ranks, command=command, form=Form.CLI, **with_preset)


async def complete(port: int, prompt: str = "Hello", tokens: int = 8) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
        response = await client.post(
            f"http://127.0.0.1:{port}/completion", json={"prompt": prompt, "n_predict": tokens}
        )
    assert response.status_code == 200, response.text
    answer: dict[str, object] = response.json()
    return answer


async def test_ready_completions_and_real_metrics(
    dpsup: Harness, llama_server: Path, tiny_model: Path
) -> None:
    deployment = await start(dpsup, 2, llama(llama_server, tiny_model))
    status = await deployment.status()
    assert [r.state for r in status.ranks] == [RankState.READY, RankState.READY]
    for rank in status.ranks:
        # Ready because llama-server said so: its own /health, past "Loading model".
        async with httpx.AsyncClient(trust_env=False) as client:
            health = await client.get(f"http://127.0.0.1:{rank.port}/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        answer = await complete(rank.port)
        assert answer["tokens_predicted"] == 8
        assert rank.command[-5:] == ("--host", "127.0.0.1", "--port", str(rank.port), "--metrics")
    async with httpx.AsyncClient(base_url=deployment.control_url, trust_env=False) as client:
        targets = (await client.get("/prometheus/targets")).json()
        for target in targets:
            (address,) = target["targets"]
            metrics = (await client.get(f"http://{address}/metrics")).text
            assert "llamacpp:n_decode_total" in metrics
            assert "llamacpp:requests_processing" in metrics
    deployment.signal_supervisor(signal.SIGTERM)
    assert await deployment.wait_exit() == 0
    await deployment.assert_no_leftovers()


async def test_a_killed_rank_fails_and_under_on_failure_returns(
    dpsup: Harness, llama_server: Path, tiny_model: Path
) -> None:
    command = llama(llama_server, tiny_model)
    deployment = await start(dpsup, 2, command)
    await deployment.signal_rank(1, signal.SIGKILL)
    assert await deployment.wait_exit() == 128 + signal.SIGKILL
    failure = await deployment.failure()
    assert isinstance(failure, RankExited)
    assert (failure.rank, failure.returncode) == (1, -signal.SIGKILL)
    await deployment.assert_no_leftovers()

    deployment = await start(dpsup, 2, command, **on_failure(0.1))
    before = await deployment.rank_pid(1)
    await deployment.signal_rank(1, signal.SIGKILL)
    status = await deployment.wait_for_status(
        lambda s: s.ranks[1].restarts == 1 and s.ranks[1].state is RankState.READY,
        "rank 1 back",
    )
    assert status.ranks[1].pid != before
    assert (await complete(status.ranks[1].port))["tokens_predicted"] == 8


async def test_a_long_prefill_is_no_stall_and_a_stopped_rank_is(
    dpsup: Harness, llama_server: Path, tiny_model: Path, tmp_path: Path
) -> None:
    # A prompt of thousands of tokens is one request that predicts nothing for seconds, in
    # batches of 256 (-b/-ub): each batch is a llama_decode() call, which the preset's
    # progress counter counts, so a 2 s progress timeout does not mistake it for a hang.
    evidence = tmp_path / "evidence"
    command = llama(llama_server, tiny_model, "-b", "256", "-ub", "256", "-c", "16384")
    deployment = await start(
        dpsup, 1, command, progress_timeout=2.0, progress_interval=0.25,
        evidence_dir=str(evidence), evidence_timeout=10.0,
    )  # fmt: skip
    port = (await deployment.status()).ranks[0].port
    prompt = " ".join(["hello world"] * 6000)
    started = trio.current_time()
    answer = await complete(port, prompt, tokens=2)
    took = trio.current_time() - started
    timings = answer["timings"]
    assert isinstance(timings, dict)
    assert timings["prompt_n"] > 5000
    # Longer than the progress timeout, or this would prove nothing.
    assert took > 2.0, f"the prefill took {took:.1f}s: make the prompt longer"
    status = await deployment.status()
    assert status.ranks[0].state is RankState.READY, f"failed during a {took:.1f}s prefill"
    assert status.failure is None
    # Stopped mid-request: busy, and no decode call any more. Caught as a stall or by the
    # probes (its /health stops answering too), whichever comes first.
    async with trio.open_nursery() as nursery:
        # Another prompt: the same one would be answered from llama.cpp's prompt cache.
        nursery.start_soon(_complete_quietly, port, " ".join(["good night"] * 6000))
        await deployment.wait_for_status(
            lambda s: s.ranks[0].progress is not None and (s.ranks[0].progress.busy or 0) > 0,
            "the rank busy",
        )
        await deployment.signal_rank(0, signal.SIGSTOP)
        with trio.fail_after(15):
            await deployment.wait_exit()
        nursery.cancel_scope.cancel()
    failure = await deployment.failure()
    assert isinstance(failure, RankStalled | RankUnhealthy), failure
    # The evidence of a native engine: its threads' native stacks (not py-spy's).
    (stacks,) = evidence.glob("*/*/stacks.txt")
    text = stacks.read_text()
    if "neither eu-stack (elfutils) nor gdb is installed" in text:
        pytest.skip("no eu-stack or gdb for native stacks (apt install elfutils)")
    assert "llama" in text or "ggml" in text, text[:2000]
    await deployment.assert_no_leftovers()


async def _complete_quietly(port: int, prompt: str) -> None:
    # The rank is stopped and killed under the request: its failure is expected.
    with contextlib.suppress(httpx.HTTPError):
        await complete(port, prompt, tokens=2)


async def test_log_dir_holds_the_engines_lines_and_a_killed_supervisor_leaves_none(
    dpsup: Harness, llama_server: Path, tiny_model: Path, tmp_path: Path
) -> None:
    log_dir = tmp_path / "logs"
    deployment = await start(dpsup, 2, llama(llama_server, tiny_model), log_dir=str(log_dir))
    ranks = (await deployment.status()).ranks
    pids = {r.pid for r in ranks}
    assert all(p is not None and psutil.pid_exists(p) for p in pids)
    deployment.signal_supervisor(signal.SIGKILL)
    assert await deployment.wait_exit() == -signal.SIGKILL
    await deployment.assert_no_leftovers(grace=5.0)
    # None of its engines anywhere, known to the harness or not; by their ports, as other
    # llama-servers (another test run, a user's) may share the machine.
    ports = [str(r.port) for r in ranks]
    left = [
        p.pid
        for p in psutil.process_iter(["exe", "cmdline"])
        if p.info["exe"] == str(llama_server)
        and any(port in ports for port in _after("--port", p.info["cmdline"] or []))
    ]
    assert not left, f"llama-servers left: {left}"
    for rank in ranks:
        # llama-server's own lines, as it wrote them (no prefix).
        text = (log_dir / f"rank-{rank.rank}.log").read_text(errors="replace")
        assert "llama_server: model loaded" in text, text[-2000:]
        assert f"listening on http://127.0.0.1:{rank.port}" in text, text[-2000:]


def _after(option: str, argv: list[str]) -> list[str]:
    """The values that follow `option` in `argv`."""
    return [value for flag, value in itertools.pairwise(argv) if flag == option]


async def test_the_canary_proves_an_idle_engine_generates_and_a_stopped_one_is_caught(
    dpsup: Harness, llama_server: Path, tiny_model: Path
) -> None:
    # The preset's canary (POST /completion, n_predict 1; idle told by
    # llamacpp:requests_processing + requests_deferred and n_decode_total) and the probes'
    # defaults; only the idle period is shorter, 6 s: longer than the 5 s after which
    # llama-server closes an idle kept connection, which each canary then finds closed.
    command = llama(llama_server, tiny_model)
    deployment = await start(
        dpsup, 1, command, canary_idle=6.0, probe_interval=1.0, probe_timeout=2.0,
        failure_threshold=3,
    )  # fmt: skip
    with trio.fail_after(60):
        status = await deployment.wait_for_status(
            lambda s: (c := s.ranks[0].canary) is not None and c.sent >= 2,
            "two canaries",
        )
    canary = status.ranks[0].canary
    assert canary is not None
    assert (canary.failed, canary.off) == (0, None)
    assert canary.last is not None
    assert canary.last.status_code == 200
    # SIGSTOP: /health stops answering; with the default probes it is caught by the probe
    # timeout: the next probe (within 1 s) times out after 2 s, then two confirmation
    # probes 0.03 s apart time out 2 s later: 4.03 to 5.03 s by construction (4.86 and
    # 4.9 s measured by bench/soak.py), asserted with room for a loaded machine.
    await deployment.signal_rank(0, signal.SIGSTOP)
    began = trio.current_time()
    with trio.fail_after(15):
        await deployment.wait_for_status(
            lambda s: s.ranks[0].failing or s.failure is not None, "the stopped rank caught"
        )
    took = trio.current_time() - began
    assert took <= 5.5, f"caught after {took:.2f}s"
    with trio.fail_after(30):
        assert await deployment.wait_exit() == 1
    failure = await deployment.failure()
    assert isinstance(failure, RankUnhealthy), failure
    await deployment.assert_no_leftovers()
