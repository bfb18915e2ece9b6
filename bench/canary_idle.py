"""The idle cost of proving generation: ``python -m bench.canary_idle [--seconds 60]
[--runs 3] [--before DIR]``.

Side by side, each supervisor with 8 idle fake ranks probed every second (the default):

* ``probes``: health probes only (no canary, no progress check): the floor;
* ``canary``: the same with what the presets turn on, ``--canary`` (one canary per idle
  rank every 10 s) and ``--progress-timeout auto`` (a read of each rank's metrics every
  5 s), on the fake rank's gauges and generation endpoint;
* ``before`` (with ``--before DIR``, a checkout of an earlier revision): that revision's
  supervisor with health probes only, run from DIR, the "today" a change is held to
  (``git worktree add /tmp/before 10b0d06``: the last revision before canaries);
* ``previous`` (with ``--previous DIR``): that revision's supervisor in the ``canary``
  setup, to compare two ways of doing the same checks.

The CPU time of each supervisor process over `--seconds` of steady state (every thread's,
from /proc/PID/task/TID/schedstat). Target (issue 29): ``canary`` no higher than the idle
CPU before canaries (0.20 % of a core then; the goal is 0.1 %). Writes
bench/results/DATE-canary-idle.json and prints one line per run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import statistics
import sys
from pathlib import Path

import trio

from trio_dpsup.testing import FAKE_RANK, CliSupervisor, free_port_range, open_cli_supervisor

from . import write_result
from .group_idle import cpu_seconds

RANKS = 8
TARGET = 0.0020  # of one core: the idle CPU at N = 8 before canaries, as the issue measured
#: The fake rank's gauges and generation endpoint, as a preset names an engine's.
CANARY = (
    "--progress-busy-metric", "fake:requests_running", "--progress-metric", "fake:tokens_total",
    "--canary-request", "POST", "/v1/completions",
    '{"model": "m", "prompt": "Hi", "max_tokens": 1}',
)  # fmt: skip


def args_for(base: int, *options: str) -> list[str]:
    return [
        "--ranks", str(RANKS), "--gpus-per-rank", "0", "--host", "127.0.0.1",
        "--base-port", str(base), "--control-port", "0", *options,
        "--", *FAKE_RANK, "--port", "{port}",
    ]  # fmt: skip


async def one_run(seconds: float, before: Path | None, previous: Path | None) -> dict[str, float]:
    setups: dict[str, tuple[list[str], dict[str, str] | None]] = {
        "probes": (args_for(free_port_range(RANKS)), None),
        "canary": (args_for(free_port_range(RANKS), *CANARY), None),
    }
    if before is not None:
        env = {**os.environ, "PYTHONPATH": str(before)}
        setups["before"] = (args_for(free_port_range(RANKS)), env)
    if previous is not None:
        env = {**os.environ, "PYTHONPATH": str(previous)}
        setups["previous"] = (args_for(free_port_range(RANKS), *CANARY), env)
    cpu: dict[str, float] = {}
    ready = trio.Event()
    started: list[str] = []

    async def measure(name: str, args: list[str], env: dict[str, str] | None) -> None:
        async with open_cli_supervisor(args, env) as sup:
            with trio.fail_after(120):
                await sup.wait_ready()
            started.append(name)
            if len(started) == len(setups):
                ready.set()
            await ready.wait()
            await trio.sleep(12.0)  # past the first canary of every rank: the steady state
            cpu[name] = await _cpu_over(sup, seconds)
            sup.process.send_signal(signal.SIGTERM)
            assert await sup.wait() == 0, sup.log

    async with trio.open_nursery() as nursery:
        for name, (args, environ) in setups.items():
            nursery.start_soon(measure, name, args, environ)
    return cpu


async def _cpu_over(sup: CliSupervisor, seconds: float) -> float:
    before = cpu_seconds(sup)
    await trio.sleep(seconds)  # the measured period itself
    return (cpu_seconds(sup) - before) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.canary_idle", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--before", type=Path, help="a checkout of an earlier revision, run with probes only"
    )
    parser.add_argument(
        "--previous", type=Path, help="a checkout of an earlier revision, run with canaries"
    )
    args = parser.parse_args()
    runs = []
    for index in range(args.runs):
        cpu = trio.run(one_run, args.seconds, args.before, args.previous)
        runs.append(cpu)
        print(
            f"run {index + 1}: "
            + ", ".join(f"{name} {value * 100:.3f} %" for name, value in sorted(cpu.items())),
            flush=True,
        )
    medians = {name: statistics.median(run[name] for run in runs) for name in runs[0]}
    floor = medians.get("before", medians["probes"])
    document = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.canary_idle", *sys.argv[1:]]),
        "ranks": RANKS,
        "seconds": args.seconds,
        "runs": runs,
        "median_fraction_of_a_core": medians,
        "canary_over_floor": medians["canary"] - floor,
        "target": f"canary <= {TARGET * 100:.2f} % and <= the floor ({floor * 100:.3f} %)",
        "met": medians["canary"] <= TARGET and medians["canary"] <= floor,
    }
    for name, value in sorted(medians.items()):
        print(f"median {name}: {value * 100:.3f} % of a core")
    print(f"target met: {document['met']}")
    write_result(f"{document['date'][:10]}-canary-idle", document)


if __name__ == "__main__":
    main()
