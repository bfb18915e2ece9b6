"""The measured scenarios. Each returns seconds; real processes on loopback, CLI form.

Clocks: trio.current_time() here and time.monotonic() in the fake ranks are both
CLOCK_MONOTONIC, so times taken in different processes can be subtracted.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import httpx
import psutil
import trio

from trio_dpsup.testing import (
    CLI,
    CliSupervisor,
    Fault,
    free_port_range,
    open_cli_supervisor,
    wait_pids_gone,
)

FAKE_RANK = (sys.executable, "-m", "trio_dpsup.testing.fake_rank")
#: Spacing of the bench's own /ready polls: the resolution of "until /ready answered 503".
POLL_SPACING = 0.001
POLL_LIMIT = 20_000


def cli_args(ranks: int, base: int, *options: str, rank_args: tuple[str, ...] = ()) -> list[str]:
    return [
        "--ranks", str(ranks), "--base-port", str(base), "--control-port", "0",
        "--gpus-per-rank", "0",
        "--probe-interval", "1", "--grace-period", "5", "--startup-timeout", "120",
        *options, "--", *FAKE_RANK, "--port", "{port}", *rank_args,
    ]  # fmt: skip


async def crash(ranks: int, tmp: Path) -> dict[str, float]:
    """SIGKILL a ready rank: until /ready answers 503, every other rank has its SIGTERM,
    every other rank is gone, the supervisor has exited."""
    base = free_port_range(ranks)
    events = tmp / f"events-{base}-{{rank}}"
    rank_args = ("--events-file", str(events))
    async with open_cli_supervisor(cli_args(ranks, base, rank_args=rank_args)) as sup:
        url, pids = await _ready_pids(sup)
        result: dict[str, float] = {}
        async with httpx.AsyncClient(base_url=url) as client:
            await client.get("/ready")  # open the connection before the clock starts
            start = trio.current_time()

            async def until_503() -> None:
                for _ in range(POLL_LIMIT):
                    if (await client.get("/ready")).status_code == 503:
                        result["ready_503"] = trio.current_time() - start
                        return
                    await trio.sleep(POLL_SPACING)

            async def until_others_gone() -> None:
                left = await wait_pids_gone(pids[1:], 30.0)
                assert not left, f"ranks {left} outlived the failure"
                result["others_gone"] = trio.current_time() - start

            async def until_exit() -> None:
                code = await sup.wait()
                assert code == 137, sup.log
                result["exit"] = trio.current_time() - start

            async with trio.open_nursery() as nursery:
                killed_at = time.monotonic()
                os.kill(pids[0], signal.SIGKILL)
                nursery.start_soon(until_503)
                nursery.start_soon(until_others_gone)
                nursery.start_soon(until_exit)
    arrivals = []
    for rank in range(1, ranks):
        text = await trio.Path(str(events).format(rank=rank)).read_text()
        times = [json.loads(line) for line in text.splitlines()]
        arrivals += [e["monotonic"] for e in times if e["event"] == "sigterm"]
    assert len(arrivals) == ranks - 1
    result["others_signalled"] = max(arrivals) - killed_at
    return result


async def crash_to_503(args: list[str]) -> float:
    """Seconds from a SIGKILL of rank 0 to /ready answering 503, for any rank command (the
    CLI's `args`): the detection figure, for a real engine as for the fake rank."""
    async with open_cli_supervisor(args) as sup:
        url, pids = await _ready_pids(sup)
        async with httpx.AsyncClient(base_url=url) as client:
            await client.get("/ready")  # open the connection before the clock starts
            start = trio.current_time()
            os.kill(pids[0], signal.SIGKILL)
            for _ in range(POLL_LIMIT):
                if (await client.get("/ready")).status_code == 503:
                    took = trio.current_time() - start
                    break
                await trio.sleep(POLL_SPACING)
            else:
                raise AssertionError("/ready never answered 503")
        assert await sup.wait() == 137, sup.log
    return took


def llama_args(ranks: int, server: str, model: str) -> list[str]:
    """The CLI's arguments for `ranks` llama-server ranks of `model` (--preset llama-cpp)."""
    base = free_port_range(ranks)
    return [
        "--ranks", str(ranks), "--base-port", str(base), "--control-port", "0",
        "--gpus-per-rank", "0", "--probe-interval", "1", "--grace-period", "5",
        "--startup-timeout", "120", "--preset", "llama-cpp", "--",
        server, "-m", model, "-c", "4096", "-t", "1", "--no-warmup",
    ]  # fmt: skip


async def _ready_pids(sup: CliSupervisor) -> tuple[str, list[int]]:
    """Once every rank is ready: the control plane's URL and the ranks' pids."""
    with trio.fail_after(120):
        url = await sup.wait_ready()
    status = await sup.status()
    pids = [r.pid for r in status.ranks if r.pid is not None]
    return url, pids


async def crash_floor() -> float:
    """A bare Trio program observing the SIGKILL of its own child."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", "import time; time.sleep(60)"]
    )
    start = trio.current_time()
    process.kill()
    await process.wait()
    return trio.current_time() - start


async def ready_overhead(ranks: int, tmp: Path, ready_after: float = 2.0) -> float:
    """From the last rank's first 200 to the supervisor's first 200 on /ready."""
    base = free_port_range(ranks)
    events = tmp / f"events-{base}-{{rank}}"
    rank_args = ("--ready-after", str(ready_after), "--events-file", str(events))
    async with open_cli_supervisor(cli_args(ranks, base, rank_args=rank_args)) as sup:
        url = await sup.control_url()
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(POLL_LIMIT):
                if (await client.get("/ready")).status_code == 200:
                    # time.monotonic, not trio.current_time (which has a random offset):
                    # it is compared with the ranks' clocks.
                    ready_at = time.monotonic()
                    break
                await trio.sleep(POLL_SPACING)
            else:
                raise AssertionError("never ready")
        sup.send_signal(signal.SIGTERM)
        await sup.wait()
    firsts: list[float] = []
    for rank in range(ranks):
        text = await trio.Path(str(events).format(rank=rank)).read_text()
        firsts.append(float(json.loads(text.splitlines()[0])["monotonic"]))
    return ready_at - max(firsts)


async def rank_exit_floor(ranks: int) -> float:
    """`ranks` fake ranks with no supervisor: SIGTERM to all at once until all have exited.

    The floor of "every other rank gone": what the ranks' own exits cost on this machine.
    """
    base = free_port_range(ranks)
    processes = await _healthy_fake_ranks(base, ranks)
    start = trio.current_time()
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        await process.wait()
    return trio.current_time() - start


async def shutdown(ranks: int, *, ignore_sigterm: bool, grace: float) -> float:
    """SIGTERM to the supervisor until it exits."""
    base = free_port_range(ranks)
    rank_args = ("--ignore-sigterm",) if ignore_sigterm else ()
    args = cli_args(ranks, base, "--grace-period", str(grace), rank_args=rank_args)
    async with open_cli_supervisor(args) as sup:
        with trio.fail_after(120):
            await sup.wait_ready()
        start = trio.current_time()
        sup.send_signal(signal.SIGTERM)
        code = await sup.wait()
        elapsed = trio.current_time() - start
        assert code == (1 if ignore_sigterm else 0), sup.log
        return elapsed


async def unhealthy(
    ranks: int,
    fault: Fault,
    interval: float,
    probe_timeout: float,
    threshold: int,
    *more: str,
    phase: float = 0.0,
) -> float:
    """A ready rank's health turns bad (`fault`: a 503, or a hang): until /ready 503.
    `more`: further options (``--fail-on-status 503``). `phase`: seconds to wait after ready
    before the fault, so that faults fall anywhere between two probes, as real ones do (the
    probes run on one clock, started with the supervisor)."""
    base = free_port_range(ranks)
    options = (
        "--probe-interval", str(interval), "--probe-timeout", str(probe_timeout),
        "--failure-threshold", str(threshold), *more,
    )  # fmt: skip
    async with open_cli_supervisor(cli_args(ranks, base, *options)) as sup:
        with trio.fail_after(120):
            url = await sup.wait_ready()
        async with httpx.AsyncClient(base_url=url) as client:
            await client.get("/ready")
            await trio.sleep(phase)  # where the fault falls between two probes
            start = trio.current_time()
            await client.post(fault.url(base))
            for _ in range(POLL_LIMIT):
                if (await client.get("/ready")).status_code == 503:
                    elapsed = trio.current_time() - start
                    break
                await trio.sleep(POLL_SPACING)
            else:
                raise AssertionError("the fault was never detected")
        await sup.wait()
    return elapsed


async def stall(
    ranks: int, progress_timeout: float, interval: float, evidence: Path | None
) -> dict[str, float]:
    """Rank 0 is busy and its progress counter stops: until /ready answers 503, until every
    other rank is gone, until rank 0 itself is gone (after its evidence, with `evidence`)."""
    base = free_port_range(ranks)
    options = [
        "--progress-timeout", str(progress_timeout), "--progress-interval", str(interval),
        "--progress-busy-metric", "fake:requests_running",
        "--progress-metric", "fake:tokens_total",
    ]  # fmt: skip
    if evidence is not None:
        options += ["--evidence-dir", str(evidence)]
    async with open_cli_supervisor(cli_args(ranks, base, *options)) as sup:
        url, pids = await _ready_pids(sup)
        result: dict[str, float] = {}
        async with httpx.AsyncClient(base_url=url) as client:
            await client.post(Fault.busy_with(1).url(base))
            for _ in range(POLL_LIMIT):  # until the supervisor has read progress twice
                entry = (await client.get("/status")).json()["ranks"][0]
                if (entry["progress"] or {}).get("progress", 0) >= 2:
                    break
                await trio.sleep(POLL_SPACING)
            start = trio.current_time()
            await client.post(Fault.stall().url(base))

            async def until_503() -> None:
                for _ in range(POLL_LIMIT * 10):
                    if (await client.get("/ready")).status_code == 503:
                        result["ready_503"] = trio.current_time() - start
                        return
                    await trio.sleep(POLL_SPACING)
                raise AssertionError("the stall was never detected")

            async def until_gone(key: str, gone: list[int]) -> None:
                left = await wait_pids_gone(gone, 60.0)
                assert not left, f"{left} outlived the failure"
                result[key] = trio.current_time() - start

            async with trio.open_nursery() as nursery:
                nursery.start_soon(until_503)
                nursery.start_soon(until_gone, "others_gone", pids[1:])
                nursery.start_soon(until_gone, "failed_gone", pids[:1])
        assert await sup.wait() == 1, sup.log
    return result


async def steady_state(ranks: int, seconds: float, *options: str) -> dict[str, float]:
    """N ready ranks probed every second: the supervisor's CPU (fraction of one core) and RSS
    over `seconds`, the guardian's RSS, and the probes' latency. `options` go to the
    supervisor after the bench's own (a later --probe-interval wins)."""
    base = free_port_range(ranks)
    async with open_cli_supervisor(cli_args(ranks, base, *options)) as sup:
        with trio.fail_after(300):
            await sup.wait_ready()
        cpu = await _idle_cpu(sup, seconds)
        rss = psutil.Process(sup.pid).memory_info().rss
        status = await sup.status()
        guardian = [
            c for c in psutil.process_iter(["cmdline"])
            if "trio_dpsup._proc.guardian_process" in " ".join(c.info["cmdline"] or [])
            and status.run_id in " ".join(c.info["cmdline"] or [])
        ]  # fmt: skip
        guardian_rss = guardian[0].memory_info().rss if guardian else float("nan")
        latencies = [r.last_probe.latency * 1000 for r in status.ranks if r.last_probe]
        sup.send_signal(signal.SIGTERM)
        await sup.wait()
    return {
        "cpu_fraction": cpu,
        "rss_mb": rss / 2**20,
        "guardian_rss_mb": guardian_rss / 2**20,
        "probe_ms_median": statistics.median(latencies),
        "probe_ms_max": max(latencies),
    }


#: Options that restart a crashing rank at once, however often.
CHURN_OPTIONS = (
    "--restart", "on-failure", "--max-restarts", "1000000", "--restart-window", "1",
    "--restart-backoff-min", "0.001", "--restart-backoff-max", "0.001",
)  # fmt: skip


async def steady_state_after_restarts(
    ranks: int, restarts: int, seconds: float, tmp: Path
) -> dict[str, float]:
    """`steady_state` of N ranks that were first restarted `restarts` times in all (each
    start exits at once until then): what the restart records cost once the ranks serve."""
    base = free_port_range(ranks)
    count = tmp / f"starts-{base}"
    args = [
        "--ranks", str(ranks), "--base-port", str(base), "--control-port", "0",
        "--gpus-per-rank", "0", "--probe-interval", "1", "--grace-period", "5",
        "--startup-timeout", "600", *CHURN_OPTIONS, "--",
        sys.executable, "-m", "bench.churn_rank", str(count), str(restarts), "--port", "{port}",
    ]  # fmt: skip
    async with open_cli_supervisor(args) as sup:
        with trio.fail_after(900):
            await sup.wait_ready()
        status = await sup.status()
        done = sum(r.restarts for r in status.ranks)
        cpu = await _idle_cpu(sup, seconds)
        sup.send_signal(signal.SIGTERM)
        await sup.wait()
    return {"cpu_fraction": cpu, "restarts": float(done)}


async def _idle_cpu(sup: CliSupervisor, seconds: float) -> float:
    """The supervisor's CPU over `seconds` of steady state, as a fraction of one core."""
    await trio.sleep(2.0)  # the measured period starts after start-up work has settled
    proc = psutil.Process(sup.pid)
    before = proc.cpu_times()
    await trio.sleep(seconds)  # the measured period itself
    after = proc.cpu_times()
    return ((after.user + after.system) - (before.user + before.system)) / seconds


async def log_throughput(ranks: int, seconds: float, tmp: Path) -> dict[str, float]:
    """Ranks writing 128-byte lines as fast as they can for `seconds`, through the supervisor
    (prefixed, to /dev/null) and, as the floor, straight to /dev/null."""
    counts = [tmp / f"count-{i}" for i in range(ranks)]
    base = free_port_range(ranks)
    args = [
        "--ranks", str(ranks), "--gpus-per-rank", "0", "--base-port", str(base),
        "--control-port", "0", "--startup-timeout", "0", "--",
        sys.executable, "-m", "bench.log_writer", str(tmp / "count-{local_rank}"), str(seconds),
    ]  # fmt: skip
    with trio.fail_after(seconds + 60):
        await trio.run_process(
            [*CLI, *args],  # its output is the load: not captured, unlike run_cli's
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        )  # fmt: skip
    through = sum(_lines_per_second(p) for p in counts)
    direct_counts = [tmp / f"direct-{i}" for i in range(ranks)]
    async with trio.open_nursery() as nursery:
        for path in direct_counts:
            nursery.start_soon(
                partial(
                    trio.run_process,
                    [sys.executable, "-m", "bench.log_writer", str(path), str(seconds)],
                    stdout=subprocess.DEVNULL,
                )
            )
    direct = sum(_lines_per_second(p) for p in direct_counts)
    mb = 128 / 1e6  # a line as the rank wrote it, prefix not counted
    return {
        "lines_per_s": through,
        "mb_per_s": through * mb,
        "floor_lines_per_s": direct,
        "floor_mb_per_s": direct * mb,
    }


def _lines_per_second(count_file: Path) -> float:
    lines, elapsed = count_file.read_text().split()
    return int(lines) / float(elapsed)


async def control_plane_latency(ranks: int, rate: float, seconds: float) -> dict[str, list[float]]:
    """/ready and /status asked `rate` times a second by another process: latencies, ms."""
    base = free_port_range(ranks)
    result: dict[str, list[float]] = {}
    async with open_cli_supervisor(cli_args(ranks, base)) as sup:
        with trio.fail_after(120):
            url = await sup.wait_ready()
        for path in ("/ready", "/status"):
            done = await trio.run_process(
                [sys.executable, "-m", "bench.load_client", url + path, str(rate), str(seconds)],
                capture_stdout=True,
            )
            result[path] = json.loads(done.stdout)
        sup.send_signal(signal.SIGTERM)
        await sup.wait()
    return result


async def contention_floor(ranks: int) -> float:
    """The floor of "crash -> /ready 503" on this machine: how long a trivial HTTP server in
    a process of its own takes to answer while `ranks` fake ranks exit on SIGTERM at once."""
    base = free_port_range(ranks + 1)
    processes = await _healthy_fake_ranks(base, ranks + 1)
    try:
        async with httpx.AsyncClient() as client:
            server = f"http://127.0.0.1:{base + ranks}/health"
            await client.get(server)  # the connection is open before the clock starts
            start = trio.current_time()
            for process in processes[:ranks]:
                process.send_signal(signal.SIGTERM)
            await client.get(server)
            return trio.current_time() - start
    finally:
        for process in processes:
            process.kill()
            await process.wait()


async def _healthy_fake_ranks(base: int, count: int) -> list[trio.Process]:
    """`count` fake ranks on ports base.., with no supervisor, once each answers 200."""
    processes = [
        await trio.lowlevel.open_process([*FAKE_RANK, "--port", str(base + i)])
        for i in range(count)
    ]
    async with httpx.AsyncClient() as client:
        for i in range(count):
            for _ in range(POLL_LIMIT):
                try:
                    if (await client.get(f"http://127.0.0.1:{base + i}/health")).is_success:
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(POLL_SPACING)  # pacing the polls of a rank still starting
    return processes
