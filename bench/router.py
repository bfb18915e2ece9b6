"""What users feel behind a router: ``python -m bench --router``.

Two llama-server ranks (the test tier's build and tiny model) behind sgl-router, 4 clients
in a closed loop (trio_dpsup.testing.open_load), and each event in turn: a rolling restart,
a restart of one rank, a drain of one rank, a SIGKILL of one rank, then a SIGTERM of the
supervisor. Twice, side by side in one run: with the router feed (``--router``), and with
the router's own health checks only (its ``--worker-urls``, checked every second; the
supervisor then has no router to tell, and no in-flight wait: ``--drain-timeout 0``, as
before the drain existed). Per event: the failed requests and the p99 latency of the
successful ones; and a planned stop's time per rank under load (drain + stop).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

import httpx
import trio

from trio_dpsup.testing import Load, free_port_range, open_cli_supervisor, open_load

__all__ = ["EVENTS", "router_runs"]

EVENTS = ("rolling restart", "restart 1", "drain 1", "SIGKILL 1", "SIGTERM")


async def _router(port: int, workers: list[str]) -> trio.Process:
    argv = [
        sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
        "--port", str(port), "--prometheus-host", "127.0.0.1", "--prometheus-port",
        str(free_port_range(1)), "--policy", "round_robin", "--health-check-interval-secs",
        "1", "--log-level", "error",
    ]  # fmt: skip
    if workers:
        argv += ["--worker-urls", *workers]
    return await trio.lowlevel.open_process(argv)


async def _until_lists(url: str, count: int) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=2) as client:
        with trio.fail_after(60):
            while True:
                try:
                    listed = (await client.get(f"{url}/workers")).json()["workers"]
                    if len([w for w in listed if w.get("is_healthy", True)]) >= count:
                        return
                except (httpx.TransportError, ValueError, KeyError):
                    pass
                await trio.sleep(0.1)


async def _ctl(sock: Path, *args: str) -> None:
    await trio.run_process(
        [sys.executable, "-m", "trio_dpsup", "ctl", "--admin-socket", str(sock), *args],
        capture_stdout=True,
        check=True,
    )


async def one_run(server: str, model: str, *, feed: bool, tmp: Path) -> dict[str, object]:
    """Every event once, under load; each event's failures, p99 and seconds."""
    base, router_port = free_port_range(2), free_port_range(1)
    url = f"http://127.0.0.1:{router_port}"
    sock = tmp / f"admin-{base}.sock"
    workers = [] if feed else [f"http://127.0.0.1:{base + i}" for i in range(2)]
    router = await _router(router_port, workers)
    options = [
        "--preset", "llama-cpp", "--ranks", "2", "--gpus-per-rank", "0", "--base-port",
        str(base), "--control-port", "0", "--admin-socket", str(sock), "--restart",
        "on-failure", "--restart-backoff-min", "0.1", "--restart-backoff-max", "0.1",
        "--min-ready", "1",
    ]  # fmt: skip
    options += ["--router", f"sglang={url}"] if feed else ["--drain-timeout", "0"]
    command = [server, "-m", model, "-c", "4096", "-t", "1", "--no-warmup", "-np", "2"]
    result: dict[str, object] = {}
    try:
        async with open_cli_supervisor([*options, "--", *command]) as sup:
            await sup.wait_ready()
            await _until_lists(url, 2)
            async with open_load(url, clients=4) as load:
                await load.settle(8)
                for event in EVENTS[:-1]:
                    start = trio.current_time()
                    with load.window(event):
                        if event == "rolling restart":
                            await _ctl(sock, "rolling-restart", "--max-unavailable", "1")
                        elif event == "restart 1":
                            await _ctl(sock, "restart", "1", "--wait")
                        elif event == "drain 1":
                            await _ctl(sock, "drain", "1")
                            await _ctl(sock, "undrain", "1")
                        else:
                            status = await sup.status()
                            pid = status.ranks[1].pid
                            assert pid is not None
                            before = status.ranks[1].restarts
                            os.kill(pid, signal.SIGKILL)
                            with trio.fail_after(60):
                                while (await sup.status()).ranks[1].restarts == before:  # noqa: ASYNC110
                                    await trio.sleep(0.05)
                        await _until_lists(url, 2)
                        await load.settle(len(load.succeeded()) + 8)
                    result[event] = _figures(load, event, trio.current_time() - start)
                start = trio.current_time()
                with load.window("SIGTERM"):
                    signalled = trio.current_time()
                    sup.send_signal(signal.SIGTERM)
                    code = await sup.wait()
                took = trio.current_time() - start
            sent_before = [r for r in load.requests if r.sent is not None and r.sent < signalled]
            lost = [r for r in sent_before if not r.ok]
            result["SIGTERM"] = {
                **_figures(load, "SIGTERM", took),
                "failed": len(lost),
                "errors": sorted({str(r.error)[:160] for r in lost}),
                "exit": code,
            }
            result["killed at the grace period"] = "had to be killed" in sup.log
    finally:
        router.terminate()
        with trio.move_on_after(10):
            await router.wait()
        router.kill()
    return result


def _figures(load: Load, event: str, seconds: float) -> dict[str, object]:
    p99 = load.latency_quantile(0.99, event)
    return {
        "failed": len(load.failed(event)),
        # What the failures said, each once: a router's 503, a reset, a timeout.
        "errors": sorted({str(r.error)[:160] for r in load.failed(event)}),
        "succeeded": len(load.succeeded(event)),
        "p99_ms": None if p99 is None else round(p99 * 1000, 1),
        "seconds": round(seconds, 2),
    }


async def router_runs(reps: int) -> list[dict[str, object]] | None:
    """`reps` runs of each form, alternated; None where the engine or router is missing."""
    import importlib.util

    from trio_dpsup.testing.llama_cpp import (
        EngineUnavailable,
        build_llama_server,
        find_llama_server,
        vocab_file,
        write_tiny_model,
    )

    if importlib.util.find_spec("sglang_router") is None:
        print("no router rows: pip install sglang-router", file=sys.stderr)
        return None
    try:
        server = find_llama_server() or build_llama_server()
    except EngineUnavailable as exc:
        print(f"no router rows: {exc}", file=sys.stderr)
        return None
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "tiny.gguf", vocab=vocab_file(server))
        for rep in range(reps):
            for feed in (True, False):
                run = await one_run(str(server), str(model), feed=feed, tmp=Path(tmp))
                runs.append({"feed": feed, "rep": rep, **run})
    return runs
