"""``python -m bench [--quick]``: run the scenarios, print a table, write JSON (and a PNG of
detection latency against the number of ranks) to bench/results/.

Every figure is measured in this run, floors included. ``--quick``: 3 repetitions, N = 8
only (64 too for idle CPU, which has a target there); the full run: 10 repetitions, N = 8,
32, 64. Idle rows measure 60 s of steady state in both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from trio_dpsup.testing import Fault, FaultKind, free_port_range

from . import scenarios

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Row:
    scenario: str
    ranks: int
    #: In `unit`.
    samples: list[float]
    target: str
    met: bool | None
    unit: str = "ms"

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)


async def engine_rows(reps: int) -> list[Row]:
    """Crash -> /ready 503 with 2 llama-server ranks and with 2 fake ranks, alternated; the
    target: the engine's median within 1.5x the fake rank's. None where llama-server is
    neither built nor buildable here."""
    from trio_dpsup.testing.llama_cpp import (
        EngineUnavailable,
        build_llama_server,
        find_llama_server,
        vocab_file,
        write_tiny_model,
    )

    try:
        server = find_llama_server() or build_llama_server()
    except EngineUnavailable as exc:
        print(f"no llama-server rows: {exc}", file=sys.stderr)
        return []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "tiny.gguf", vocab=vocab_file(server))
        engine: list[float] = []
        fake: list[float] = []
        for _ in range(reps):
            engine.append(await scenarios.crash_to_503(
                scenarios.llama_args(2, str(server), str(model))
            ))  # fmt: skip
            fake.append(await scenarios.crash_to_503(scenarios.cli_args(2, free_port_range(2))))
    ratio = [statistics.median(engine) / statistics.median(fake)]
    # The real-engine tier of the test suite, the engine built: its whole test time.
    started = trio.current_time()
    tests = Path(__file__).parent.parent / "tests" / "test_llama_cpp.py"
    await trio.run_process(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
        capture_stdout=True,
    )
    tier = [trio.current_time() - started]
    return [
        Row(
            "real-engine test tier (tests/test_llama_cpp.py), built",
            2,
            tier,
            "<= 300",
            check(300)(tier),
            "s",
        ),
        Row("crash -> /ready 503, llama-server ranks", 2, ms(engine), "-", None),
        Row("crash -> /ready 503, fake ranks (same runs, alternated)", 2, ms(fake), "-", None),
        Row("llama-server / fake rank, medians", 2, ratio, "<= 1.5", check(1.5)(ratio), "x"),
    ]


async def router_rows(reps: int, runs_seen: list[dict[str, object]]) -> list[Row]:
    """`bench/router.py`'s runs as rows: per event, failed requests and p99 latency with the
    router feed and with the router's health checks only; a planned stop's time per rank.
    The runs themselves (each event's errors included) are added to `runs_seen`."""
    from . import router

    runs = await router.router_runs(reps)
    if runs is None:
        return []
    runs_seen.extend(runs)
    rows: list[Row] = []
    for event in router.EVENTS:
        for feed, how in ((True, "--router"), (False, "health checks only")):
            figures = [r[event] for r in runs if r["feed"] is feed]
            failed = [float(f["failed"]) for f in figures]  # type: ignore[index]
            p99 = [float(f["p99_ms"]) for f in figures if f["p99_ms"] is not None]  # type: ignore[index]
            zero = event != "SIGKILL 1" and feed
            target = "0" if zero else ("<= 4" if feed else "-")
            met = check(maximum=0)(failed) if zero else (check(maximum=4)(failed) if feed else None)
            rows.append(Row(f"{event}: failed requests, {how}", 2, failed, target, met, "requests"))
            if p99:
                rows.append(Row(f"{event}: p99 latency, {how}", 2, p99, "-", None))
    per_rank = [float(r["rolling restart"]["seconds"]) / 2 for r in runs if r["feed"]]  # type: ignore[index]
    rows.append(Row("planned stop per rank under load (drain + stop + ready), --router", 2,
                    per_rank, "-", None, "s"))  # fmt: skip
    sigterm = [float(r["SIGTERM"]["seconds"]) for r in runs if r["feed"]]  # type: ignore[index]
    rows.append(Row("SIGTERM under load -> exit, --router", 2, sigterm, "-", None, "s"))
    return rows


def ms(seconds: list[float]) -> list[float]:
    return [s * 1000 for s in seconds]


def check(
    median: float | None = None, maximum: float | None = None, minimum: float | None = None
) -> Callable[[list[float]], bool]:
    def met(samples: list[float]) -> bool:
        ok = True
        if median is not None:
            ok &= statistics.median(samples) <= median
        if maximum is not None:
            ok &= max(samples) <= maximum
        if minimum is not None:
            ok &= statistics.median(samples) >= minimum
        return ok

    return met


async def run_all(quick: bool) -> list[Row]:
    reps = 3 if quick else 10
    sizes = (8,) if quick else (8, 32, 64)
    # Idle CPU is counted in clock ticks (10 ms): over 10 s that cannot tell 0.25 % of a
    # core from 0.35 %, over 60 s it resolves 0.017 %. The quick run measures as long.
    idle_seconds = 60.0
    rows: list[Row] = []

    # 1. Crash detection, against the floors.
    floor = ms([await scenarios.crash_floor() for _ in range(reps)])
    rows.append(Row("floor: bare Trio sees its child's SIGKILL", 1, floor, "-", None))
    for n in sizes:
        # The floors of this size: what N-1 ranks exiting at once cost with no supervisor.
        exit_floor = ms([await scenarios.rank_exit_floor(n - 1) for _ in range(reps)])
        busy = ms([await scenarios.contention_floor(n - 1) for _ in range(reps)])
        rows += [
            Row(f"floor: {n - 1} fake ranks alone, SIGTERM -> all gone", n, exit_floor, "-", None),
            Row(f"floor: a bare HTTP server's answer while {n - 1} ranks exit", n, busy, "-", None),
        ]  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            runs = [await scenarios.crash(n, Path(tmp)) for _ in range(reps)]
        ready = ms([r["ready_503"] for r in runs])
        if n == 8:
            target, met = "median <= 5, max <= 20", check(5, 20)(ready)
        elif n == 64:
            target, met = "median <= 20", check(20)(ready)
        else:
            target, met = "-", None
        gone = ms([r["others_gone"] for r in runs])
        rows += [
            Row("crash -> /ready 503", n, ready, target, met),
            Row(
                "crash -> every other rank has its SIGTERM",
                n,
                ms([r["others_signalled"] for r in runs]),
                "-",
                None,
            ),
            Row("crash -> every other rank gone", n, gone, "max <= 100", check(None, 100)(gone)),
            Row("crash -> supervisor exited", n, ms([r["exit"] for r in runs]), "-", None),
        ]

    # 2. Unhealthy detection, against the configured bound.
    interval, timeout, threshold = 0.2, 0.5, 3
    for fault, bound in (
        (Fault.health(503), threshold * interval),
        (Fault.hang(), threshold * (interval + timeout)),
    ):
        taken = ms([
            await scenarios.unhealthy(4, fault, interval, timeout, threshold) for _ in range(reps)
        ])  # fmt: skip
        bound_ms = bound * 1000 + 50  # plus the probes' own latency and our polling
        name = "health 503" if fault.kind is FaultKind.HEALTH else "health hangs"
        rows.append(
            Row(f"{name} -> /ready 503 (0.2 s x 3, timeout 0.5 s)", 4, taken,
                f"max <= {bound_ms:.0f} (bound)", check(None, bound_ms)(taken))
        )  # fmt: skip

    # 2a. The prober's targets, at the settings vLLM's supervisor uses. Faults fall at
    # random points between two probes (seeded: the same points every run), 9 of each.
    phases = random.Random(15).sample([i / 9 + 1 / 18 for i in range(9)], 9)
    for fault, more, name, target, limit in (
        (Fault.health(503), (), "explicit 503", "median <= 700", 700),
        (Fault.health(503), ("--fail-on-status", "503"), "explicit 503, --fail-on-status 503",
         "median <= 600", 600),
        (Fault.hang(), (), "health hangs", "median <= 3500", 3500),
    ):  # fmt: skip
        taken = ms([
            await scenarios.unhealthy(4, fault, 1.0, 1.0, 3, *more, phase=phase)
            for phase in phases
        ])  # fmt: skip
        rows.append(
            Row(f"{name} -> /ready 503 (1 s x 3, timeout 1 s)", 4, taken, target,
                check(limit)(taken))
        )  # fmt: skip

    # 2b. Stall detection (progress), and what the evidence capture adds.
    timeout, interval = 1.0, 0.25
    with tempfile.TemporaryDirectory() as tmp:
        plain = [await scenarios.stall(4, timeout, interval, None) for _ in range(reps)]
        kept = [await scenarios.stall(4, timeout, interval, Path(tmp)) for _ in range(reps)]
    bound_ms = (timeout + interval) * 1000 + 100  # a read at most an interval after the bound
    detected = ms([r["ready_503"] for r in plain])
    rows.append(
        Row("stall -> /ready 503 (--progress-timeout 1 s, interval 0.25 s)", 4, detected,
            f"max <= {bound_ms:.0f} (bound)", check(None, bound_ms)(detected))
    )  # fmt: skip
    for name, runs in (("without evidence", plain), ("with --evidence-dir", kept)):
        rows += [
            Row(f"stall -> /ready 503, {name}", 4, ms([r["ready_503"] for r in runs]), "-", None),
            Row(f"stall -> every other rank gone, {name}", 4,
                ms([r["others_gone"] for r in runs]), "-", None),
            Row(f"stall -> the stalled rank gone, {name}", 4,
                ms([r["failed_gone"] for r in runs]), "-", None),
        ]  # fmt: skip
    added = ms([k["failed_gone"] - p["failed_gone"] for p, k in zip(plain, kept, strict=True)])
    rows.append(Row("evidence: time added to the stalled rank's own stop", 4, added, "-", None))

    # 3. Ready overhead.
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            overhead = ms([await scenarios.ready_overhead(n, Path(tmp)) for _ in range(reps)])
        rows.append(
            Row("ready overhead (ranks healthy after 2 s)", n, overhead, "median <= 50",
                check(50)(overhead))
        )  # fmt: skip

    # 4. Shutdown.
    clean = ms([await scenarios.shutdown(4, ignore_sigterm=False, grace=5.0) for _ in range(reps)])
    rows.append(Row("SIGTERM -> exit, obedient ranks", 4, clean, "-", None))
    grace = 3.0
    stubborn = ms([
        await scenarios.shutdown(1, ignore_sigterm=True, grace=grace) - grace for _ in range(reps)
    ])  # fmt: skip
    rows.append(
        Row("SIGTERM -> exit beyond the 3 s grace, rank ignores SIGTERM", 1, stubborn,
            "max < 500", check(None, 500)(stubborn))
    )  # fmt: skip

    # 5 and 6. Idle cost, and how it scales (64 in the quick run too: it has a target).
    for n in sorted({*sizes, 64}):
        steady = await scenarios.steady_state(n, idle_seconds)
        cpu = [steady["cpu_fraction"] * 100]
        cpu_target, cpu_met = {
            8: ("<= 0.25", check(0.25)(cpu)),
            64: ("<= 2", check(2)(cpu)),
        }.get(n, ("-", None))
        rss_target, rss_met = ("<= 60", check(60)([steady["rss_mb"]])) if n == 8 else ("-", None)
        rows += [
            Row(f"idle: supervisor CPU over {idle_seconds:.0f} s, probes every 1 s", n, cpu,
                cpu_target, cpu_met, "% core"),
            Row("idle: supervisor RSS", n, [steady["rss_mb"]], rss_target, rss_met, "MB"),
            Row("idle: guardian RSS", n, [steady["guardian_rss_mb"]], "-", None, "MB"),
            Row("idle: probe latency (last probe of each rank)", n,
                [steady["probe_ms_median"], steady["probe_ms_max"]], "-", None),
        ]  # fmt: skip
    # Restart records are pruned: the idle cost after 2,000 restarts, against a fresh run.
    with tempfile.TemporaryDirectory() as tmp:
        fresh = await scenarios.steady_state(8, idle_seconds, *scenarios.CHURN_OPTIONS)
        churned = await scenarios.steady_state_after_restarts(8, 2000, idle_seconds, Path(tmp))
    ratio = [churned["cpu_fraction"] / fresh["cpu_fraction"]]
    rows += [
        Row(f"idle: supervisor CPU after {churned['restarts']:.0f} restarts", 8,
            [churned["cpu_fraction"] * 100], "-", None, "% core"),
        Row("idle CPU after 2,000 restarts / fresh (same options)", 8, ratio, "<= 1.2",
            check(1.2)(ratio), "x"),
    ]  # fmt: skip
    # A real engine: crash -> /ready 503 with llama-server ranks, against the fake rank.
    rows += await engine_rows(reps)
    # One probe's CPU: the same ranks probed every second, and not at all (every 10 min).
    probed = await scenarios.steady_state(32, idle_seconds)
    unprobed = await scenarios.steady_state(32, idle_seconds, "--probe-interval", "600")
    per_probe = (probed["cpu_fraction"] - unprobed["cpu_fraction"]) / 32 * 1e6  # 32 probes/s
    rows.append(Row("CPU of one probe (32 ranks, 1 s apart, against none)", 32, [per_probe],
                    "-", None, "us"))  # fmt: skip

    # 7. Log throughput.
    with tempfile.TemporaryDirectory() as tmp:
        logs = await scenarios.log_throughput(2, 5.0, Path(tmp))
    rows += [
        Row("logs: 2 ranks flat out for 5 s, prefixed, through the supervisor", 2,
            [logs["mb_per_s"]], ">= 50", check(minimum=50)([logs["mb_per_s"]]), "MB/s"),
        Row("logs: the same ranks straight to /dev/null (floor)", 2,
            [logs["floor_mb_per_s"]], "-", None, "MB/s"),
    ]  # fmt: skip

    # 8. The control plane under load from another process.
    latency = await scenarios.control_plane_latency(8, 200.0, 5.0)
    for path, samples in latency.items():
        p99 = statistics.quantiles(samples, n=100)[98]
        target, met = ("p99 <= 5", p99 <= 5) if path == "/ready" else ("-", None)
        rows.append(
            Row(f"{path} at 200 requests/s for 5 s: median, p99", 8,
                [statistics.median(samples), p99], target, met)
        )  # fmt: skip
    return rows


def table(rows: list[Row]) -> str:
    header = f"{'scenario':<66} {'N':>3} {'median':>9} {'max':>9} {'unit':<7} {'target':<24} met"
    lines = [header, "-" * len(header)]
    for row in rows:
        met = "-" if row.met is None else ("yes" if row.met else "MISSED")
        lines.append(
            f"{row.scenario:<66} {row.ranks:>3} {row.median:>9.2f} {row.max:>9.2f} "
            f"{row.unit:<7} {row.target:<24} {met}"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, cores: int) -> bool:
    """Detection latency against N, as a PNG; False where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (
        ("crash -> /ready 503", "o-"),
        ("crash -> every other rank has its SIGTERM", "s-"),
        ("crash -> every other rank gone", "^-"),
    ):
        chosen = [r for r in rows if r.scenario == name]
        ns = [r.ranks for r in chosen]
        ax.plot(ns, [r.median for r in chosen], style, label=f"{name} (median)")
        ax.fill_between(ns, [min(r.samples) for r in chosen], [r.max for r in chosen], alpha=0.15)
    for prefix, style in (
        ("floor: a bare HTTP server's answer while", "o:"),
        ("floor: ", "^:"),
    ):
        chosen = [r for r in rows if r.scenario.startswith(prefix) and r.ranks > 1]
        if prefix == "floor: ":
            chosen = [r for r in chosen if r.scenario.endswith("all gone")]
        label = (
            "floor: server answer while N-1 ranks exit"
            if "answer" in prefix
            else ("floor: N-1 ranks alone, SIGTERM -> all gone")
        )
        ax.plot([r.ranks for r in chosen], [r.median for r in chosen], style, color="grey",
                label=label)  # fmt: skip
    ax.set_xlabel("ranks (N)")
    ax.set_ylabel("ms after a rank's SIGKILL (band: min-max)")
    ax.set_title(f"trio_dpsup crash detection, {cores}-core machine")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


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
    parser.add_argument("--plot", metavar="RESULTS.json", help="only draw the plot of a run")
    parser.add_argument(
        "--router",
        action="store_true",
        help="only the rows behind a real router (bench/router.py): 3 runs of each form",
    )
    args = parser.parse_args()
    if args.router:
        runs_seen: list[dict[str, object]] = []
        rows = trio.run(router_rows, 3, runs_seen)
        print(table(rows))
        info = machine()
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{info['date'][:10]}-router.json"  # type: ignore[index]
        document = {
            **info,
            "rows": [{**asdict(r), "median": r.median, "max": r.max} for r in rows],
            "runs": runs_seen,
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nwrote {path}")
        return
    if args.plot:
        document = json.loads(Path(args.plot).read_text())
        fields = {"scenario", "ranks", "samples", "target", "met", "unit"}
        saved = [Row(**{k: v for k, v in row.items() if k in fields}) for row in document["rows"]]
        cores = int(document["machine"].split(", ")[1].split()[0])
        plot(saved, Path(args.plot).with_name(Path(args.plot).stem + "-detection.png"), cores)
        return
    rows = trio.run(run_all, args.quick)
    print(table(rows))
    info = machine()
    RESULTS.mkdir(exist_ok=True)
    stem = f"{info['date'][:10]}{'-quick' if args.quick else ''}"  # type: ignore[index]
    document = {
        **info,
        "quick": args.quick,
        "rows": [{**asdict(row), "median": row.median, "max": row.max} for row in rows],
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {RESULTS / stem}.json")
    if not args.quick and plot(rows, RESULTS / f"{stem}-detection.png", os.cpu_count() or 0):
        print(f"wrote {RESULTS / stem}-detection.png")
