"""Soak: false failures per rank-hour on real llama.cpp ranks under a mixed workload, and
detection latency per fault, for the preset's defaults beside a fixed-timeout setup.

    python -m bench.soak --minutes 30          # the issue's ask: at least 30 minutes

Two supervisors run side by side, each with `--ranks` llama-server ranks of the tiny model
(trio_dpsup.testing.llama_cpp), ``--restart on-failure`` so that a failure is counted and
the run goes on:

* ``defaults``: ``--preset llama-cpp`` and nothing else about health: the canary (one
  per idle rank every 10 s), ``--progress-timeout auto``, the default probes;
* ``fixed``: the same with ``--no-canary --progress-timeout 5``, the fixed limit a user
  might pick.

Each rank gets the same mixed workload, chosen at random per step: a long prefill (a
prompt of about 13k tokens, two tokens predicted), a burst (8 concurrent completions of
16 tokens), or an idle gap of 5-25 s (long enough for canaries). Every restart of a rank
during the soak is a false failure: nothing was wrong with it.

Then the faults, each timed from its injection to the rank taken out (``failing``) or the
supervisor failed, per setup: SIGSTOP of a llama-server rank (the probes), and on fake
ranks, a generation that hangs while /health answers (``generate-hang``: the canary) and
a busy rank whose counter stops (``stall``: the progress check). A fault not caught within
`FAULT_WAIT` seconds is reported as not caught.

Results go to bench/results/DATE-soak.json (``--name``), with the soak's actual length.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import httpx
import trio

from trio_dpsup.testing import (
    CliSupervisor,
    Fault,
    free_port_range,
    inject_fault,
    open_cli_supervisor,
)
from trio_dpsup.testing.llama_cpp import find_llama_server, vocab_file, write_tiny_model

from . import write_result

FAKE_RANK = (sys.executable, "-m", "trio_dpsup.testing.fake_rank")
#: The longest a fault is given to be caught.
FAULT_WAIT = 60.0
SETUPS = {
    "defaults": (),
    "fixed": ("--no-canary", "--progress-timeout", "5"),
}


@dataclass
class Workload:
    """What one setup's ranks were asked to do."""

    prefills: int = 0
    prefill_tokens: list[int] = field(default_factory=list)
    prefill_seconds: list[float] = field(default_factory=list)
    bursts: int = 0
    idle_gaps: int = 0
    idle_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def _common(ranks: int, base: int) -> list[str]:
    return [
        "--ranks", str(ranks), "--base-port", str(base), "--control-port", "0",
        "--gpus-per-rank", "0", "--preset", "llama-cpp", "--restart", "on-failure",
        "--max-restarts", "1000", "--startup-timeout", "300",
    ]  # fmt: skip


def _llama(server: str, model: str) -> list[str]:
    # -b/-ub 256: a long prompt is many llama_decode() calls (the preset's counter moves).
    return [
        server, "-m", model, "-c", "16384", "-t", "1", "--no-warmup", "-b", "256", "-ub", "256",
    ]  # fmt: skip


async def _rank_load(
    client: httpx.AsyncClient, port: int, until: float, seed: int, work: Workload
) -> None:
    rng = random.Random(seed)
    url = f"http://127.0.0.1:{port}/completion"
    step = 0
    while trio.current_time() < until:  # bounded by `until`
        step += 1
        kind = rng.choice(("prefill", "burst", "idle"))
        try:
            if kind == "prefill":
                prompt = f"{seed} {step} " + "hello world " * 6500  # unique: no prompt cache
                began = trio.current_time()
                answer = (await client.post(url, json={"prompt": prompt, "n_predict": 2})).json()
                work.prefills += 1
                work.prefill_tokens.append(int(answer["timings"]["prompt_n"]))
                work.prefill_seconds.append(round(trio.current_time() - began, 2))
            elif kind == "burst":
                async with trio.open_nursery() as nursery:
                    for i in range(8):
                        body = {"prompt": f"burst {step} {i}", "n_predict": 16}
                        nursery.start_soon(partial(client.post, url, json=body))
                work.bursts += 1
            else:
                gap = rng.uniform(5.0, 25.0)
                await trio.sleep(min(gap, max(0.0, until - trio.current_time())))  # the idle gap
                work.idle_gaps += 1
                work.idle_seconds += gap
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            work.errors.append(f"{kind}: {type(exc).__name__}: {exc}"[:200])
            await trio.sleep(1.0)  # a rank restarting: give it a moment, then go on


async def _soak_one(
    name: str, sup: CliSupervisor, seconds: float, results: dict[str, object]
) -> None:
    work = Workload()
    status = await sup.status()
    until = trio.current_time() + seconds
    began = time.monotonic()
    async with (
        httpx.AsyncClient(timeout=600, trust_env=False) as client,
        trio.open_nursery() as nursery,
    ):
        for index, rank in enumerate(status.ranks):
            nursery.start_soon(_rank_load, client, rank.port, until, index, work)
    took = time.monotonic() - began
    final = await sup.status()
    restarts = sum(r.restarts for r in final.ranks)
    failures = restarts + (final.failure is not None)
    rank_hours = len(final.ranks) * took / 3600
    results[name] = {
        "seconds": round(took, 1),
        "ranks": len(final.ranks),
        "false_failures": failures,
        "false_failures_per_rank_hour": round(failures / rank_hours, 3),
        "causes": [str(c) for r in final.ranks for c in r.last_causes],
        "canaries": [
            None if r.canary is None else {"sent": r.canary.sent, "failed": r.canary.failed}
            for r in final.ranks
        ],
        "progress_limits_s": [
            None if r.progress is None else r.progress.limit for r in final.ranks
        ],
        "workload": asdict(work),
    }


async def _caught(sup: CliSupervisor, rank: int) -> None:
    while True:  # bounded by the caller's FAULT_WAIT
        status = await sup.status()
        if status.ranks[rank].failing or status.ranks[rank].restarts or status.failure:
            return
        await trio.sleep(0.05)  # the bench's own polling resolution


async def _time_fault(sup: CliSupervisor, inject: Callable[[], Awaitable[None]]) -> float | None:
    began = trio.current_time()
    await inject()
    with trio.move_on_after(FAULT_WAIT):
        await _caught(sup, 0)
        return round(trio.current_time() - began, 2)
    return None


async def _faults(server: str, model: str, results: dict[str, object]) -> None:
    for name, options in SETUPS.items():
        rows: dict[str, float | None] = {}
        base = free_port_range(1)
        args = [*_common(1, base), *options, "--", *_llama(server, model)]
        async with open_cli_supervisor(args) as sup:
            with trio.fail_after(300):
                await sup.wait_ready()
            pid = (await sup.status()).ranks[0].pid
            assert pid is not None
            await trio.sleep(12.0)  # idle a canary period first: the steady state
            rows["sigstop_llama"] = await _time_fault(sup, partial(_signal, pid, signal.SIGSTOP))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        fake_options = [
            "--progress-busy-metric", "fake:requests_running",
            "--progress-metric", "fake:tokens_total",
            "--canary-request", "POST", "/v1/completions",
            '{"model": "m", "prompt": "Hi", "max_tokens": 1}',
        ]  # fmt: skip
        if name == "fixed":
            fake_options = [*fake_options, "--no-canary", "--progress-timeout", "5"]
        for fault in ("generate-hang", "stall"):
            base = free_port_range(1)
            args = [
                "--ranks", "1", "--base-port", str(base), "--control-port", "0",
                "--gpus-per-rank", "0", "--restart", "on-failure", *fake_options,
                "--", *FAKE_RANK, "--port", "{port}",
            ]  # fmt: skip
            async with open_cli_supervisor(args) as sup:
                with trio.fail_after(60):
                    await sup.wait_ready()
                await trio.sleep(12.0)  # idle a canary period first: the steady state

                async def inject(fault: str = fault, base: int = base) -> None:
                    if fault == "stall":
                        await inject_fault(base, Fault.busy_with(1))
                        await inject_fault(base, Fault.stall())
                    else:
                        await inject_fault(base, Fault.generate_hang())

                rows[f"{fault}_fake"] = await _time_fault(sup, inject)
        results[name] = rows


async def _signal(pid: int, signum: int) -> None:
    os.kill(pid, signum)


async def run(minutes: float, ranks: int, tmp: Path) -> dict[str, object]:
    server = find_llama_server()
    if server is None:
        raise SystemExit("no llama-server here: python -m trio_dpsup.testing.llama_cpp builds it")
    model = write_tiny_model(tmp / "tiny.gguf", vocab=vocab_file(server))
    soak: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        for name, options in SETUPS.items():
            base = free_port_range(ranks)
            args = [*_common(ranks, base), *options, "--", *_llama(str(server), str(model))]

            async def one(name: str = name, args: list[str] = args) -> None:
                async with open_cli_supervisor(args) as sup:
                    with trio.fail_after(300):
                        await sup.wait_ready()
                    await _soak_one(name, sup, minutes * 60, soak)
                    sup.process.send_signal(signal.SIGTERM)

            nursery.start_soon(one)
    faults: dict[str, object] = {}
    await _faults(str(server), str(model), faults)
    return {"soak": soak, "detection_s": faults}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0, help="soak length (default 30)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks per setup (default 2)")
    parser.add_argument(
        "--name", default="soak", help="results file: bench/results/DATE-NAME.json (default soak)"
    )
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        began = time.time()
        document = trio.run(run, args.minutes, args.ranks, Path(tmp))
    document = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(began)),
        "asked_minutes": args.minutes,
        **document,
    }
    print(json.dumps(document, indent=2))
    write_result(f"{document['date'][:10]}-{args.name}", document)  # type: ignore[index]


if __name__ == "__main__":
    main()
