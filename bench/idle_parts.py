"""What the two most frequent pieces of idle work cost: ``python -m bench.idle_parts
[--runs 5] [--previous DIR]``.

* ``probe``: the CPU of one health probe, as the prober makes them: 8 fake ranks, one
  probe task each, all woken by one event per round (as `prober.Ticker` wakes them), 2,000
  rounds, kept connections;
* ``walk``: the CPU of one tree-watch round over 8 rank processes (`sleep`), main threads
  only (nine rounds in ten), 3,000 rounds, with this process as their subreaper.

Each is the measuring thread's CPU time (CLOCK_THREAD_CPUTIME_ID, which counts the kernel's
work for its syscalls too) over the loop, per probe or per round. With ``--previous DIR``
(a checkout of an earlier revision, e.g. ``git worktree add /tmp/previous HEAD``), the same
is measured of DIR's code, in turns with this tree's, so that both see the same machine.
The supervisor's whole idle CPU is bench/canary_idle.py's. Writes
bench/results/DATE-idle-parts.json and prints one line per run.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TypedDict

ROOT = Path(__file__).resolve().parent.parent
RANKS = 8
PR_SET_CHILD_SUBREAPER = 36


class Parts(TypedDict):
    """One measurement of one tree's code."""

    probe_us: float
    walk_us: float
    #: Where its trio_dpsup was imported from.
    source: str


async def _probe_cost(ports: range, rounds: int) -> float:
    import trio
    import trio.testing

    from trio_dpsup._ranks.http_probe import HttpProbe

    probes = [HttpProbe("127.0.0.1", port, "/health") for port in ports]
    for probe in probes:  # a connection kept, as between a ready rank's probes
        assert (await probe.probe(2.0)).ok
    tick = [trio.Event()]
    done = 0

    async def prober(probe: HttpProbe) -> None:
        nonlocal done
        while True:
            await tick[0].wait()
            assert (await probe.probe(2.0)).ok
            done += 1

    async with trio.open_nursery() as nursery:
        for probe in probes:
            nursery.start_soon(prober, probe)
        await trio.testing.wait_all_tasks_blocked()
        start = time.thread_time()
        for _ in range(rounds):
            this, tick[0] = tick[0], trio.Event()
            this.set()
            await trio.sleep(0.004)  # the answers are in: every task waits again
        spent = time.thread_time() - start
        nursery.cancel_scope.cancel()
    return spent / done


def _started_ranks() -> tuple[range, list[subprocess.Popen[bytes]]]:
    from trio_dpsup.testing import FAKE_RANK, free_port_range

    base = free_port_range(RANKS)
    ports = range(base, base + RANKS)
    ranks = [
        subprocess.Popen([*FAKE_RANK, "--port", str(port)], stdout=subprocess.DEVNULL)
        for port in ports
    ]
    deadline = time.monotonic() + 30
    for port in ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"no fake rank on port {port} in 30 s") from None
                time.sleep(0.05)
    return ports, ranks


def _walk_cost(rounds: int) -> float:
    from trio_dpsup._proc.membership import Trees

    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    ranks = [subprocess.Popen(["sleep", "600"]) for _ in range(RANKS)]
    try:
        trees = Trees("bench", adopter=os.getpid())
        for rank, process in enumerate(ranks):
            trees.add_root(rank, process.pid)
        trees.walk(trees.orphans(), every_thread=False)  # first sight: by path
        start = time.thread_time()
        for _ in range(rounds):
            trees.walk(trees.orphans(), every_thread=False)
        spent = time.thread_time() - start
        close = getattr(trees, "close", None)  # revisions before kept files have none
        if close is not None:
            close()
        return spent / rounds
    finally:
        for process in ranks:
            process.kill()
            process.wait()


def measure() -> Parts:
    import trio

    import trio_dpsup

    ports, ranks = _started_ranks()
    try:
        probe = trio.run(_probe_cost, ports, 2000)
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    return Parts(
        probe_us=probe * 1e6,
        walk_us=_walk_cost(3000) * 1e6,
        source=str(Path(trio_dpsup.__file__).parent.parent),
    )


def _run_in(source: Path) -> Parts:
    # Run as a file, not with -m: -m would put the working directory, this tree, ahead of
    # PYTHONPATH, and measure this tree's code as the previous one's.
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure"],
        env={**os.environ, "PYTHONPATH": str(source)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    parts: Parts = json.loads(out)
    if Path(parts["source"]).resolve() != source:
        raise SystemExit(f"measured {parts['source']}, not {source}")
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_parts", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--previous", type=Path, help="a checkout of an earlier revision")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure()))
        return
    trees = {"now": ROOT}
    if args.previous is not None:
        trees["previous"] = args.previous.resolve()
    runs: list[dict[str, Parts]] = []
    for index in range(args.runs):
        run = {name: _run_in(source) for name, source in trees.items()}
        runs.append(run)
        print(
            f"run {index + 1}: "
            + ", ".join(
                f"{name} probe {r['probe_us']:.1f} µs, walk {r['walk_us']:.1f} µs"
                for name, r in run.items()
            ),
            flush=True,
        )
    medians = {
        name: {
            "probe_us": statistics.median(run[name]["probe_us"] for run in runs),
            "walk_us": statistics.median(run[name]["walk_us"] for run in runs),
        }
        for name in trees
    }
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    document = {
        "date": date,
        "command": " ".join(["python -m bench.idle_parts", *sys.argv[1:]]),
        "ranks": RANKS,
        "sources": {name: str(source) for name, source in trees.items()},
        "runs": runs,
        "medians": medians,
    }
    for name, parts in medians.items():
        print(f"median {name}: probe {parts['probe_us']:.1f} µs, walk {parts['walk_us']:.1f} µs")
    from bench import write_result  # here: run as a file to measure, there is no package

    write_result(f"{date[:10]}-idle-parts", document)


if __name__ == "__main__":
    main()
