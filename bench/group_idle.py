"""The idle cost of watching a peer: ``python -m bench.group_idle [--seconds 60] [--runs 3]``.

Side by side, on loopback, each with one fake rank probed every second (the default): a
member of a group of two (each member asks the other and answers its asks, --peer-timeout
5: the default) and, as the floor, a supervisor with --group and no peer. The CPU time of
each supervisor process over `--seconds` of steady state (psutil, from /proc); the cost of
one peer is a member's CPU minus the floor's. Target (issue 30): at most 0.05 % of a core
per peer. Writes bench/results/DATE-group-idle.json and prints one line per run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import sys
from pathlib import Path

import psutil
import trio

from trio_dpsup.testing import FAKE_RANK, CliSupervisor, free_port_range, open_cli_supervisor

RESULTS = Path(__file__).parent / "results"
TARGET = 0.0005  # of one core, per peer


def args_for(base: int, control: int, *group: str) -> list[str]:
    return [
        "--ranks", "1", "--gpus-per-rank", "0", "--host", "127.0.0.1",
        "--base-port", str(base), "--control-port", str(control), "--group", *group,
        "--", *FAKE_RANK, "--port", "{port}",
    ]  # fmt: skip


async def cpu_seconds(sup: CliSupervisor) -> float:
    times = psutil.Process(sup.pid).cpu_times()
    return float(times.user + times.system)


async def one_run(seconds: float) -> dict[str, float]:
    base = free_port_range(6)  # three ranks, three control planes
    a = args_for(base, base + 3, "--group-member", "0", f"--group-peer=http://127.0.0.1:{base + 4}")
    b = args_for(
        base + 1, base + 4, "--group-member", "1", f"--group-peer=http://127.0.0.1:{base + 3}"
    )
    solo = args_for(base + 2, base + 5)
    async with (
        open_cli_supervisor(a) as member_a,
        open_cli_supervisor(b) as member_b,
        open_cli_supervisor(solo) as floor,
    ):
        with trio.fail_after(120):
            for member in (member_a, member_b):
                await member.wait_for_line(r"the group is ready")
            await floor.wait_ready()
        await trio.sleep(2.0)  # the measured period starts after start-up work has settled
        sups = (member_a, member_b, floor)
        before = [await cpu_seconds(s) for s in sups]
        await trio.sleep(seconds)  # the measured period itself
        after = [await cpu_seconds(s) for s in sups]
        for sup in sups:
            sup.send_signal(signal.SIGTERM)
            await sup.wait()
    a_cpu, b_cpu, floor_cpu = ((y - x) / seconds for x, y in zip(before, after, strict=True))
    return {
        "member_a": a_cpu,
        "member_b": b_cpu,
        "floor": floor_cpu,
        "per_peer": statistics.mean([a_cpu, b_cpu]) - floor_cpu,
    }


async def main(seconds: float, runs: int) -> None:
    results = []
    for index in range(runs):
        result = await one_run(seconds)
        results.append(result)
        print(
            f"run {index + 1}: member {result['member_a']:.4%} / {result['member_b']:.4%} of a "
            f"core, floor {result['floor']:.4%}, per peer {result['per_peer']:.4%} "
            f"(target <= {TARGET:.2%})",
            flush=True,
        )
    per_peer = statistics.median(r["per_peer"] for r in results)
    print(f"median per peer: {per_peer:.4%} of a core; target <= {TARGET:.2%}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{datetime.date.today().isoformat()}-group-idle.json"
    info = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "seconds": seconds}
    path.write_text(json.dumps({"info": info, "runs": results, "median_per_peer": per_peer},
                               indent=2) + "\n")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.group_idle", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    trio.run(main, options.seconds, options.runs)
