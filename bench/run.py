"""``python -m bench [--quick]``: run the scenarios, print a table, write JSON to bench/results/."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from . import scenarios

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Row:
    scenario: str
    ranks: int
    samples: list[float]
    target: str
    met: bool | None
    floor_ms: float | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1000

    @property
    def max_ms(self) -> float:
        return max(self.samples) * 1000


def check(
    median: float | None = None, maximum: float | None = None
) -> Callable[[list[float]], bool]:
    def met(samples: list[float]) -> bool:
        ok = True
        if median is not None:
            ok &= statistics.median(samples) <= median
        if maximum is not None:
            ok &= max(samples) <= maximum
        return ok

    return met


async def run_all(quick: bool) -> list[Row]:
    reps = 3 if quick else 10
    crash_sizes = (8,) if quick else (8, 32, 64)
    rows: list[Row] = []
    floor = [await scenarios.crash_floor() for _ in range(reps)]
    floor_ms = statistics.median(floor) * 1000
    rows.append(Row("crash floor: bare Trio sees its child's SIGKILL", 1, floor, "-", None))
    exit_floor = [await scenarios.rank_exit_floor(7) for _ in range(reps)]
    rows.append(Row("floor: 7 fake ranks alone, SIGTERM -> all exited", 7, exit_floor, "-", None))
    for n in crash_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            runs = [await scenarios.crash(n, Path(tmp)) for _ in range(reps)]
        ready = [r["ready_503"] for r in runs]
        signalled = [r["others_signalled"] for r in runs]
        gone = [r["others_gone"] for r in runs]
        exits = [r["exit"] for r in runs]
        if n == 8:
            target, met = "median <= 5 ms, max <= 20 ms", check(0.005, 0.020)(ready)
        else:
            target, met = ("median <= 20 ms", check(0.020)(ready)) if n == 64 else ("-", None)
        rows.append(Row("crash -> /ready 503", n, ready, target, met, floor_ms))
        rows.append(Row("crash -> every other rank has its SIGTERM", n, signalled, "-", None))
        rows.append(
            Row("crash -> every other rank gone", n, gone, "<= 100 ms", check(None, 0.1)(gone))
        )
        rows.append(Row("crash -> supervisor exited", n, exits, "-", None))
    with tempfile.TemporaryDirectory() as tmp:
        overhead = [await scenarios.ready_overhead(4, Path(tmp)) for _ in range(reps)]
    rows.append(
        Row(
            "ready overhead (ranks healthy after 2 s)",
            4,
            overhead,
            "median <= 50 ms",
            check(0.050)(overhead),
        )
    )
    clean = [await scenarios.shutdown(4, ignore_sigterm=False, grace=5.0) for _ in range(reps)]
    rows.append(Row("SIGTERM -> exit, obedient ranks", 4, clean, "-", None))
    grace = 3.0
    stubborn = [
        await scenarios.shutdown(1, ignore_sigterm=True, grace=grace) - grace for _ in range(reps)
    ]
    rows.append(
        Row(
            "SIGTERM -> exit beyond the 3 s grace, rank ignores SIGTERM",
            1,
            stubborn,
            "< 500 ms",
            check(None, 0.5)(stubborn),
        )
    )
    return rows  # fmt: skip


def table(rows: list[Row]) -> str:
    header = f"{'scenario':<60} {'N':>3} {'median ms':>10} {'max ms':>9}  {'target':<30} met"
    lines = [header, "-" * len(header)]
    for row in rows:
        met = "-" if row.met is None else ("yes" if row.met else "MISSED")
        lines.append(
            f"{row.scenario:<60} {row.ranks:>3} {row.median_ms:>10.2f} {row.max_ms:>9.2f}  "
            f"{row.target:<30} {met}"
        )
    return "\n".join(lines)


def machine() -> dict[str, object]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": sys.version.split()[0],
        "commit": commit or None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 repetitions, N = 8 only")
    args = parser.parse_args()
    rows = trio.run(run_all, args.quick)
    print(table(rows))
    info = machine()
    RESULTS.mkdir(exist_ok=True)
    name = f"{info['date'][:10]}{'-quick' if args.quick else ''}.json"  # type: ignore[index]
    document = {
        **info,
        "quick": args.quick,
        "rows": [{**asdict(row), "median_ms": row.median_ms, "max_ms": row.max_ms} for row in rows],
    }
    (RESULTS / name).write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {RESULTS / name}")
