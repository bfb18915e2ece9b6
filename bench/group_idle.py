"""The idle cost of watching peers: ``python -m bench.group_idle [--seconds 60] [--runs 3]``.

Side by side, on loopback, each supervisor with one fake rank probed every second (the
default) and --peer-timeout 5 (the default): a pair that asks each other (--group-peer both
ways: each member asks one peer and answers its asks), a star of three as under
LeaderWorkerSet (two workers ask the leader; the leader answers two), and, as the floor, a
supervisor with --group and no peer. The CPU time of each supervisor process over
`--seconds` of steady state (every thread's, from /proc/PID/task/TID/schedstat). The cost of
one peer: a pair member's CPU minus the floor's; a worker's minus the floor's; the leader's
minus the floor's, halved. Target (issue 30): at most 0.05 % of a core per peer. Writes
bench/results/DATE-group-idle.json and prints one line per run.
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

TARGET = 0.0005  # of one core, per peer


def args_for(base: int, control: int, *group: str) -> list[str]:
    return [
        "--ranks", "1", "--gpus-per-rank", "0", "--host", "127.0.0.1",
        "--base-port", str(base), "--control-port", str(control), "--group", *group,
        "--", *FAKE_RANK, "--port", "{port}",
    ]  # fmt: skip


def peer(port: int) -> str:
    return f"--group-peer=http://127.0.0.1:{port}"


def cpu_seconds(sup: CliSupervisor) -> float:
    """The CPU time of every thread of `sup` so far, in nanoseconds' precision: the first
    field of /proc/PID/task/TID/schedstat (the kernel's run time of the thread). psutil's
    user + system times count clock ticks (10 ms): over a minute, 0.017 % of a core, a
    third of the target."""
    total = 0
    for task in Path(f"/proc/{sup.pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just exited
    return total / 1e9


async def one_run(seconds: float) -> dict[str, float]:
    base = free_port_range(12)  # six ranks, then six control planes
    c = base + 6
    commands = {
        "pair_a": args_for(base, c, "--group-member", "0", peer(c + 1)),
        "pair_b": args_for(base + 1, c + 1, "--group-member", "1", peer(c)),
        "leader": args_for(base + 2, c + 2, "--group-member", "0", "--group-size", "3"),
        "worker_1": args_for(base + 3, c + 3, "--group-member", "1", "--group-size", "3",
                             peer(c + 2)),
        "worker_2": args_for(base + 4, c + 4, "--group-member", "2", "--group-size", "3",
                             peer(c + 2)),
        "floor": args_for(base + 5, c + 5),
    }  # fmt: skip
    async with (
        open_cli_supervisor(commands["pair_a"]) as pair_a,
        open_cli_supervisor(commands["pair_b"]) as pair_b,
        open_cli_supervisor(commands["leader"]) as leader,
        open_cli_supervisor(commands["worker_1"]) as worker_1,
        open_cli_supervisor(commands["worker_2"]) as worker_2,
        open_cli_supervisor(commands["floor"]) as floor,
    ):
        sups = {"pair_a": pair_a, "pair_b": pair_b, "leader": leader, "worker_1": worker_1,
                "worker_2": worker_2, "floor": floor}  # fmt: skip
        with trio.fail_after(120):
            for name, sup in sups.items():
                if name == "floor":
                    await sup.wait_ready()
                else:
                    await sup.wait_for_line(r"the group is ready")
        await trio.sleep(2.0)  # the measured period starts after start-up work has settled
        before = {name: cpu_seconds(sup) for name, sup in sups.items()}
        await trio.sleep(seconds)  # the measured period itself
        cpu = {name: (cpu_seconds(sup) - before[name]) / seconds for name, sup in sups.items()}
        for sup in sups.values():
            sup.send_signal(signal.SIGTERM)
        for sup in sups.values():
            await sup.wait()
    floor_cpu = cpu["floor"]
    return {
        **cpu,
        "per_peer_pair": statistics.mean([cpu["pair_a"], cpu["pair_b"]]) - floor_cpu,
        "per_peer_leader": (cpu["leader"] - floor_cpu) / 2,
        "per_peer_worker": statistics.mean([cpu["worker_1"], cpu["worker_2"]]) - floor_cpu,
    }


async def main(seconds: float, runs: int) -> None:
    results = []
    for index in range(runs):
        result = await one_run(seconds)
        results.append(result)
        print(
            f"run {index + 1}: floor {result['floor']:.3%} of a core; per peer: pair "
            f"{result['per_peer_pair']:.3%}, star leader {result['per_peer_leader']:.3%}, "
            f"star worker {result['per_peer_worker']:.3%} (target <= {TARGET:.2%})",
            flush=True,
        )
    medians = {
        key: statistics.median(r[key] for r in results)
        for key in ("per_peer_pair", "per_peer_leader", "per_peer_worker")
    }
    print("medians per peer: " + ", ".join(f"{k[9:]} {v:.3%}" for k, v in medians.items()))
    info = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "seconds": seconds}
    document = {"info": info, "runs": results, "medians": medians, "target": TARGET}
    write_result(f"{datetime.date.today().isoformat()}-group-idle", document)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.group_idle", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    trio.run(main, options.seconds, options.runs)
