"""A fake rank with faults: ``python -m trio_dpsup.testing.fake_rank --port {port} [faults]``.

The demo rank server plus the faults a supervisor must survive, chosen by flag at start and
by HTTP at run time: ``POST /fault/{kind}?...``, each kind and its parameters declared in
faults.py (`Fault`: health answers, a hang, an exit, busy, a stall, /metrics errors).

``GET /metrics`` serves a busy gauge and a progress counter in the Prometheus text format,
named as ``--metric-names`` says (``fake``, or ``vllm`` and ``sglang`` for their own names).
The counter advances by one at each read while the rank is busy and not stalled, so a
supervisor that reads it sees progress exactly when there is some.

``--log-lines N`` writes N numbered lines, alternately to stdout and stderr, at
``--log-rate`` lines a second; ``--last-words TEXT`` is written to stdout with no newline
just before every exit the rank makes itself (SIGTERM, ``--exit-after``, ``/fault/exit``):
what a supervisor that relays rank output must not lose.

``--pid-file`` gets one JSON line per process it started (``{"role": ..., "pid": ...}``),
written before the server listens: once the rank is healthy, the file is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..demo import (
    DemoHandler,
    DemoServer,
    SignalHandler,
    allocate_gpu_memory,
    build_parser,
    exit_cleanly,
    serve,
    use_tls,
)
from .faults import Fault, FaultKind

__all__ = ["GRANDCHILD_KINDS", "METRIC_NAMES", "engine_step_stalled_in_fake_rank", "main"]

#: (busy gauge, progress counter) by ``--metric-names``: the fake's own, and the names vLLM
#: and SGLang serve (see trio_dpsup/_config/presets.py for where they are documented).
METRIC_NAMES = {
    "fake": ("fake:requests_running", "fake:tokens_total"),
    "vllm": ("vllm:num_requests_running", "vllm:generation_tokens_total"),
    "sglang": ("sglang:num_running_reqs", "sglang:generation_tokens_total"),
}

#: The grandchildren `--grandchild` starts, each long-lived unless killed:
#:
#: * ``group``: stays in the rank's process group; ``setsid``: calls setsid;
#:   ``double-fork``: double-forks into a new session (its parent exits, so it re-parents);
#: * ``setproctitle``: stays in the group and renames itself as vLLM's engine core does
#:   (which overwrites what /proc shows of its environment, tree cookie included);
#: * ``env-i``: stays in the group, started through ``env -i`` (no environment at all);
#: * ``setsid-setproctitle``, ``setsid-env-i``: double-forks into a new session, then the
#:   same: it keeps neither the rank's session, nor its parent, nor the cookie;
#: * ``hopper``: forks and exits every 2 ms, calling setsid at each step: a new pid and a
#:   new session each time, the cookie kept;
#: * ``orphan-churn``: the rank double-forks a helper that exits at once, every 50 ms:
#:   zombies for whoever adopts them;
#: * ``escape``: stays in the group with the cookie until ``--escape-fifo`` is written to,
#:   then calls setsid and setproctitle (same pid: it left after it was seen), and says so
#:   by writing to ``--escape-fifo`` + ``.done``;
#: * ``escape-from-thread``: the same, started by a thread of the rank that stays alive (so
#:   it is that thread's child, not the main thread's).
GRANDCHILD_KINDS = (
    "group",
    "setsid",
    "double-fork",
    "setproctitle",
    "env-i",
    "setsid-setproctitle",
    "setsid-env-i",
    "hopper",
    "orphan-churn",
    "escape",
    "escape-from-thread",
)

# The long-lived grandchild. argv: lock file ('' for none), new title (''), fifo to wait on
# before escaping (''), hop ('1': fork-and-exit every 2 ms). It holds a shared flock on the
# lock file (a test takes it exclusively to learn that every such process is gone), prints
# its pid, lets go of the pipe, and sleeps.
_SLEEPER = """
import fcntl, os, sys, time
lock, title, fifo, hop = sys.argv[1:5]
if lock:
    held = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_SH)
if title:
    import setproctitle
    setproctitle.setproctitle(title)
print(os.getpid(), flush=True)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
if fifo:
    with open(fifo, "rb") as f:
        f.read()
    os.setsid()
    import setproctitle
    setproctitle.setproctitle("escaped")
    with open(fifo + ".done", "wb") as f:
        f.write(b"escaped")
if hop == "1":
    for _ in range(1_000_000):
        if os.fork():
            os._exit(0)
        os.setsid()
        time.sleep(0.002)
time.sleep(3600)
"""
# Starts argv[1:] in a new session and exits, so it is orphaned.
_DOUBLE_FORK = "import subprocess, sys\nsubprocess.Popen(sys.argv[1:], start_new_session=True)\n"
#: What the setproctitle kinds call themselves: vLLM's name for its engine process.
ENGINE_TITLE = "VLLM::EngineCore"


class FaultHandler(DemoHandler):
    server: FaultServer

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            fault = Fault.from_request(url.path, query)
        except ValueError as exc:
            self.reply(400, f"{exc}\n")
            return
        if fault is None:
            self.reply(404, "not found\n")
            return
        server = self.server
        if fault.kind is FaultKind.HEALTH:
            server.health_override, server.health_override_left = fault.status, fault.count
        elif fault.kind is FaultKind.HANG:
            server.health_hang.set()
        elif fault.kind is FaultKind.BUSY:
            assert fault.busy is not None
            server.busy = fault.busy
        elif fault.kind is FaultKind.STALL:
            if not server.stalled.is_set():
                server.stalled.set()
                threading.Thread(target=engine_step_stalled_in_fake_rank, daemon=True).start()
        elif fault.kind is FaultKind.METRICS:
            assert fault.status is not None
            server.metrics_status = fault.status
        self.reply(200, "ok\n")
        if fault.kind is FaultKind.EXIT:
            assert fault.code is not None
            self.wfile.flush()
            _exit(fault.code)

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/metrics":
            status, text = self.server.metrics()
            self.reply(status, text, "text/plain; version=0.0.4")
        else:
            super().do_GET()


def engine_step_stalled_in_fake_rank() -> None:
    """Blocks for ever: the stalled engine a stack dump must show by this name."""
    threading.Event().wait()


class FaultServer(DemoServer):
    handler_class = FaultHandler

    def __init__(
        self, host: str, port: int, health_path: str, ready_after: float, api_key: str | None
    ) -> None:
        self.health_override: int | None = None
        #: Answers left with the override; None: for good.
        self.health_override_left: int | None = None
        self.health_hang = threading.Event()
        self.first_healthy: float | None = None
        self.events_file: str | None = None
        self.unhealthy_file: str | None = None
        self.metric_names = METRIC_NAMES["fake"]
        self.busy = 0.0
        self.progress = 0
        self.stalled = threading.Event()
        self.metrics_status: int | None = None
        self._metrics_lock = threading.Lock()
        super().__init__(host, port, health_path, ready_after, api_key)

    def metrics(self) -> tuple[int, str]:
        if self.metrics_status is not None:
            return self.metrics_status, "metrics fault injected\n"
        busy_name, progress_name = self.metric_names
        with self._metrics_lock:  # handler threads: one read, one step
            if self.busy > 0 and not self.stalled.is_set():
                self.progress += 1
            progress = self.progress
        family = progress_name.removesuffix("_total")
        labels = '{model_name="fake"}'
        return 200, (
            f"# TYPE {busy_name} gauge\n{busy_name}{labels} {self.busy}\n"
            f"# TYPE {family} counter\n{progress_name}{labels} {float(progress)}\n"
        )

    def health(self) -> tuple[int, str]:
        if self.unhealthy_file is not None and os.path.exists(self.unhealthy_file):
            return 503, "unhealthy: the fault file exists\n"
        if self.health_hang.is_set():
            threading.Event().wait()  # a daemon handler thread, so this never blocks exit
        if self.health_override is not None:
            status = self.health_override
            if self.health_override_left is not None:
                self.health_override_left -= 1
                if self.health_override_left <= 0:
                    self.health_override = None
            return status, "fault injected\n"
        status, text = super().health()
        if status == 200 and self.first_healthy is None:
            self.first_healthy = time.monotonic()
            _record_event(self.events_file, "first-200", self.first_healthy)
        return status, text


def _build_parser() -> argparse.ArgumentParser:
    parser = build_parser("python -m trio_dpsup.testing.fake_rank")
    parser.add_argument("--ignore-sigterm", action="store_true", help="ignore SIGTERM")
    parser.add_argument("--ignore-sigint", action="store_true", help="ignore SIGINT")
    parser.add_argument(
        "--stop-delay", type=float, default=0.0, help="seconds to take to exit on SIGTERM"
    )
    parser.add_argument(
        "--grandchild",
        action="append",
        choices=GRANDCHILD_KINDS,
        default=[],
        help="start a long-lived grandchild of this kind (repeatable)",
    )
    parser.add_argument("--pid-file", help="append one JSON line per process started")
    parser.add_argument(
        "--lock-file",
        help="every grandchild holds a shared flock on this file until it dies: whoever gets "
        "it exclusively knows that none is left",
    )
    parser.add_argument("--escape-fifo", help="--grandchild escape: escape once this is written")
    parser.add_argument(
        "--events-file",
        help='append {"event": E, "monotonic": T} when health first answers 200 (first-200) '
        "and when SIGTERM arrives (sigterm)",
    )
    parser.add_argument(
        "--exit-after",
        type=float,
        help="exit by itself after this many seconds, with --exit-code",
    )
    parser.add_argument("--exit-code", type=int, default=1)
    parser.add_argument(
        "--unhealthy-if-exists",
        metavar="PATH",
        help="answer 503 on the health path while PATH exists (a fault that outlives restarts)",
    )
    parser.add_argument("--log-lines", type=int, default=0, help="log lines to write")
    parser.add_argument(
        "--log-rate", type=float, default=0.0, help="log lines a second (0: as fast as it can)"
    )
    parser.add_argument("--last-words", help="written with no newline just before exiting")
    parser.add_argument(
        "--metric-names",
        choices=sorted(METRIC_NAMES),
        default="fake",
        help="whose names /metrics uses for its busy gauge and progress counter",
    )
    return parser


def _start_grandchild(kind: str, lock_file: str | None, escape_fifo: str | None) -> int:
    if kind == "escape-from-thread":
        return _from_thread(lambda: _start_grandchild("escape", lock_file, escape_fifo))
    if kind == "orphan-churn":
        threading.Thread(target=_churn_orphans, daemon=True).start()
        return os.getpid()
    title = ENGINE_TITLE if kind.endswith("setproctitle") else ""
    if kind == "escape" and not escape_fifo:
        raise SystemExit("--grandchild escape needs --escape-fifo PATH")
    fifo = escape_fifo if kind == "escape" else ""
    sleeper = [
        sys.executable,
        "-c",
        _SLEEPER,
        lock_file or "",
        title,
        fifo or "",
        "1" if kind == "hopper" else "",
    ]
    if kind.endswith("env-i"):
        sleeper = ["env", "-i", *sleeper]
    double = kind.startswith("setsid-") or kind == "double-fork"
    argv = [sys.executable, "-c", _DOUBLE_FORK, *sleeper] if double else sleeper
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, start_new_session=kind == "setsid")
    assert child.stdout is not None
    pid = int(child.stdout.readline())
    child.stdout.close()
    if double:
        child.wait()  # the middle process exits at once; reap it
    return pid


def _from_thread(start: Callable[[], int]) -> int:
    """`start()` in a new thread that then waits for good; its result."""
    result: queue.SimpleQueue[int] = queue.SimpleQueue()

    def run() -> None:
        result.put(start())
        threading.Event().wait()  # alive: what it started stays its child

    threading.Thread(target=run, daemon=True).start()
    return result.get()


def _churn_orphans() -> None:
    """Double-fork a helper that exits at once, every 50 ms, for as long as the rank runs."""
    while True:
        child = os.fork()
        if child == 0:
            os.setsid()
            if os.fork() == 0:
                os._exit(0)
            os._exit(0)
        os.waitpid(child, 0)
        time.sleep(0.05)  # pacing the fault, not waiting for anything


def _record(pid_file: str | None, role: str, pid: int) -> None:
    if pid_file is not None:
        with open(pid_file, "a") as f:
            f.write(json.dumps({"role": role, "pid": pid}) + "\n")


def _record_event(events_file: str | None, event: str, monotonic: float) -> None:
    """time.monotonic() is CLOCK_MONOTONIC: comparable across processes on one machine."""
    if events_file is not None:
        with open(events_file, "a") as f:
            f.write(json.dumps({"event": event, "monotonic": monotonic}) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    args = _build_parser().parse_args(argv)
    _record(args.pid_file, "rank", os.getpid())
    for kind in args.grandchild:
        pid = _start_grandchild(kind, args.lock_file, args.escape_fifo)
        _record(args.pid_file, f"grandchild-{kind}", pid)
    global _last_words
    _last_words = args.last_words
    if args.log_lines:
        threading.Thread(
            target=_write_log, args=(args.log_lines, args.log_rate, args.port), daemon=True
        ).start()
    if args.exit_after is not None:
        timer = threading.Timer(args.exit_after, _exit, (args.exit_code,))
        timer.daemon = True
        timer.start()
    on_sigterm: SignalHandler = _obey
    if args.ignore_sigterm:
        on_sigterm = signal.SIG_IGN
    elif args.stop_delay:
        on_sigterm = _slow_exit(args.stop_delay)
    if args.events_file and callable(on_sigterm):
        on_sigterm = _noting_arrival(on_sigterm, args.events_file)
    held = allocate_gpu_memory(args.allocate) if args.allocate else None  # noqa: F841
    server = FaultServer(args.host, args.port, args.health_path, args.ready_after, args.api_key)
    use_tls(server, args.ssl_certfile, args.ssl_keyfile)
    server.events_file = args.events_file
    server.unhealthy_file = args.unhealthy_if_exists
    server.metric_names = METRIC_NAMES[args.metric_names]
    serve(server, on_sigterm, signal.SIG_IGN if args.ignore_sigint else _obey)


#: Written by `_exit` with no newline; set once, by main().
_last_words: str | None = None


def _say_last_words() -> None:
    if _last_words is not None:
        sys.stdout.write(_last_words)
        sys.stdout.flush()


def _exit(code: int) -> None:
    """Exit now with `code` (a negative code: killed by that signal), after the last words."""
    _say_last_words()
    if code < 0:
        os.kill(os.getpid(), -code)
    os._exit(code)


def _write_log(lines: int, rate: float, port: int) -> None:
    for i in range(lines):
        stream = sys.stdout if i % 2 == 0 else sys.stderr
        print(f"fake rank {port}: log line {i} of {lines}", file=stream, flush=True)
        if rate > 0:
            time.sleep(1 / rate)  # pacing the output, not waiting for anything


def _obey(signum: int, frame: FrameType | None) -> None:
    _say_last_words()
    exit_cleanly(signum, frame)


def _noting_arrival(handler: Callable[[int, FrameType | None], Any], path: str) -> SignalHandler:
    def noting(signum: int, frame: FrameType | None) -> None:
        _record_event(path, "sigterm", time.monotonic())
        handler(signum, frame)

    return noting


def _slow_exit(delay: float) -> SignalHandler:
    def handler(signum: int, frame: FrameType | None) -> None:
        time.sleep(delay)  # the fault itself: a server that takes this long to shut down
        _exit(0)

    return handler


if __name__ == "__main__":
    main()
