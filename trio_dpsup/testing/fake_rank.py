"""A fake rank with faults: ``python -m trio_dpsup.testing.fake_rank --port {port} [faults]``.

The demo rank server plus the faults a supervisor must survive, chosen by flag at start and
by HTTP at run time: ``POST /fault/{kind}?...``, each kind and its parameters declared in
faults.py (`Fault`: health answers, a hang, an exit, busy, a stall, /metrics errors, a
generation that hangs or fails).

``POST /v1/completions`` generates, in the shape of vLLM's OpenAI-compatible server
(``CompletionResponse`` in vllm/entrypoints/openai/protocol.py: ``id`` "cmpl-...",
``object`` "text_completion", ``created``, ``model``, ``choices`` [{``index``, ``text``,
``logprobs``, ``finish_reason``, ``stop_reason``}], ``usage``; errors as its
``ErrorResponse``, ``{"error": {"message", "type", "param", "code"}}``): ``max_tokens``
fake tokens (16 when not given), each ``--token-seconds`` apart, streamed as server-sent
events ending in ``data: [DONE]`` when ``stream`` is true. It needs ``--api-key`` where one
is given and, with ``--served-model-name``, that model (404 otherwise, as vLLM).

``GET /metrics`` serves a busy gauge and a progress counter in the Prometheus text format,
named as ``--metric-names`` says (``fake``, or ``vllm`` and ``sglang`` for their own names).
The gauge is the busy fault's value plus the completions in flight (a hung one stays in
flight). The counter advances by one for each token generated, and at each read while the
busy fault is on; never while stalled. A supervisor that reads them sees progress exactly
when there is some.

``--load-seconds S`` is a model load with visible progress: for S seconds the rank reads a
file of its own from the disk (its page cache dropped before each read, so
``/proc/PID/io`` read_bytes grows) and writes a line to stdout for each step; health
answers 503 until it ends. ``--load-wedge`` is a load that never ends and shows no
progress: a thread spins a CPU, reading and writing nothing, and health answers 503 for
good (a collective that waits for ever burns CPU too).

``--log-lines N`` writes N numbered lines, alternately to stdout and stderr, at
``--log-rate`` lines a second; ``--last-words TEXT`` is written to stdout with no newline
just before every exit the rank makes itself (SIGTERM, ``--exit-after``, ``/fault/exit``):
what a supervisor that relays rank output must not lose.

``--pid-file`` gets one JSON line per process it started (``{"role": ..., "pid": ...}``),
written before the server listens: once the rank is healthy, the file is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http import HTTPStatus
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

__all__ = [
    "COMPLETIONS_PATH",
    "GRANDCHILD_KINDS",
    "METRIC_NAMES",
    "engine_step_stalled_in_fake_rank",
    "generation_hung_in_fake_rank",
    "load_wedged_in_fake_rank",
    "main",
]

#: Where the fake rank generates: vLLM's OpenAI-compatible completions path.
COMPLETIONS_PATH = "/v1/completions"
#: The largest completion request body read, and the most tokens one may ask for.
MAX_BODY_BYTES = 1 << 20
MAX_TOKENS = 4096
#: OpenAI's default ``max_tokens`` for completions.
DEFAULT_MAX_TOKENS = 16
#: What each fake token reads.
TOKEN_TEXT = " ok"
#: --load-seconds: each step reads this many bytes, then waits this long.
LOAD_CHUNK_BYTES = 256 * 1024
LOAD_STEP_SECONDS = 0.2

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
        if url.path == COMPLETIONS_PATH:
            try:
                self.complete()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client left: its request is over
            return
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
        elif fault.kind in (FaultKind.GENERATE_HANG, FaultKind.GENERATE_ERROR):
            server.set_generation_fault(fault)
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

    def complete(self) -> None:
        """``POST /v1/completions`` (see the module's docstring)."""
        server = self.server
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # the body, if any, is left unread
            self.reply_error(413 if length.isdigit() else 411, "a Content-Length up to 1 MiB")
            return
        try:
            body = json.loads(self.rfile.read(int(length)))
        except ValueError as exc:
            self.reply_error(400, f"the body is not JSON: {exc}")
            return
        if not server.authorized(self.headers.get("Authorization")):
            self.reply_error(401, "missing or wrong bearer key")
            return
        if not isinstance(body, dict):
            self.reply_error(400, "the body is not a JSON object")
            return
        model, max_tokens = body.get("model"), body.get("max_tokens", DEFAULT_MAX_TOKENS)
        if server.served_model_name is not None and model != server.served_model_name:
            self.reply_error(404, f"The model `{model}` does not exist.")
            return
        if type(max_tokens) is not int or not 1 <= max_tokens <= MAX_TOKENS:
            self.reply_error(400, f"max_tokens must be an integer from 1 to {MAX_TOKENS}")
            return
        if not server.loaded.is_set():
            self.reply_error(503, "the model is loading")
            return
        fault = server.take_generation_fault()
        if fault is not None and fault.kind is FaultKind.GENERATE_ERROR:
            assert fault.status is not None
            self.reply_error(fault.status, "generation failed: generate-error fault injected")
            return
        completion = _Completion(str(model or "fake"), body.get("prompt"), max_tokens)
        with server.in_flight():
            if fault is not None:  # generate-hang
                generation_hung_in_fake_rank()
            if body.get("stream") is True:
                self.stream(completion)
            else:
                for _ in range(max_tokens):
                    server.generate_token()
                self.reply(200, json.dumps(completion.answer()), "application/json")

    def stream(self, completion: _Completion) -> None:
        """Server-sent events, one per token, then ``data: [DONE]``, chunked."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for index in range(completion.max_tokens):
            self.server.generate_token()
            self.send_chunk(f"data: {json.dumps(completion.chunk(index))}\n\n")
        self.send_chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def send_chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def reply_error(self, status: int, message: str) -> None:
        """An error in the shape of vLLM's ``ErrorResponse``."""
        phrase = HTTPStatus(status).phrase.replace(" ", "") if status in _STATUSES else ""
        kind = phrase if phrase.endswith("Error") else f"{phrase}Error"  # NotFoundError...
        error = {"message": message, "type": kind, "param": None, "code": status}
        self.reply(status, json.dumps({"error": error}), "application/json")


_STATUSES = {s.value for s in HTTPStatus}


class _Completion:
    """One completion's answer, whole or as stream chunks."""

    def __init__(self, model: str, prompt: object, max_tokens: int) -> None:
        self.id = f"cmpl-{os.urandom(16).hex()}"
        self.created = int(time.time())
        self.model = model
        # Words stand for tokens: the usage need only be plausible.
        self.prompt_tokens = len(prompt.split()) if isinstance(prompt, str) else 0
        self.max_tokens = max_tokens

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
        }

    def answer(self) -> dict[str, Any]:
        choice = {
            "index": 0,
            "text": TOKEN_TEXT * self.max_tokens,
            "logprobs": None,
            "finish_reason": "length",  # it always stops at max_tokens
            "stop_reason": None,
        }
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + self.max_tokens,
            "completion_tokens": self.max_tokens,
        }
        return {**self._head(), "choices": [choice], "usage": usage}

    def chunk(self, index: int) -> dict[str, Any]:
        last = index == self.max_tokens - 1
        choice = {
            "index": 0,
            "text": TOKEN_TEXT,
            "logprobs": None,
            "finish_reason": "length" if last else None,
            "stop_reason": None,
        }
        return {**self._head(), "choices": [choice]}


def engine_step_stalled_in_fake_rank() -> None:
    """Blocks for ever: the stalled engine a stack dump must show by this name."""
    threading.Event().wait()


def generation_hung_in_fake_rank() -> None:
    """Blocks for ever (a daemon handler thread): the hung generation of ``generate-hang``,
    by this name in a stack dump."""
    threading.Event().wait()


def load_wedged_in_fake_rank() -> None:
    """Spins for ever, reading and writing nothing: ``--load-wedge``, by this name in a
    stack dump."""
    while True:
        pass


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
        #: Completions being generated (or hung): counted in the busy gauge.
        self.generating = 0
        #: The generation fault in force, and how many requests it has left (None: all).
        self.generation_fault: Fault | None = None
        self.generation_fault_left: int | None = None
        self.served_model_name: str | None = None
        self.token_seconds = 0.0
        #: Set once the model is loaded (at once, without --load-seconds or --load-wedge).
        self.loaded = threading.Event()
        self.loaded.set()
        self._metrics_lock = threading.Lock()
        super().__init__(host, port, health_path, ready_after, api_key)

    def set_generation_fault(self, fault: Fault) -> None:
        with self._metrics_lock:
            self.generation_fault, self.generation_fault_left = fault, fault.count

    def take_generation_fault(self) -> Fault | None:
        """The generation fault for one request, its count spent by one."""
        with self._metrics_lock:
            fault = self.generation_fault
            if self.generation_fault_left is not None:
                self.generation_fault_left -= 1
                if self.generation_fault_left <= 0:
                    self.generation_fault = self.generation_fault_left = None
            return fault

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        with self._metrics_lock:
            self.generating += 1
        try:
            yield
        finally:
            with self._metrics_lock:
                self.generating -= 1

    def generate_token(self) -> None:
        """One decode step: it takes --token-seconds, never ends while stalled, and counts."""
        if self.token_seconds > 0:
            time.sleep(self.token_seconds)  # the fake's decode time, not a wait for anything
        if self.stalled.is_set():
            engine_step_stalled_in_fake_rank()
        with self._metrics_lock:
            self.progress += 1

    def metrics(self) -> tuple[int, str]:
        if self.metrics_status is not None:
            return self.metrics_status, "metrics fault injected\n"
        busy_name, progress_name = self.metric_names
        with self._metrics_lock:  # handler threads: one read, one step
            if self.busy > 0 and not self.stalled.is_set():
                self.progress += 1
            progress = self.progress
            running = self.busy + self.generating
        family = progress_name.removesuffix("_total")
        labels = '{model_name="fake"}'
        return 200, (
            f"# TYPE {busy_name} gauge\n{busy_name}{labels} {float(running)}\n"
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
        if not self.loaded.is_set():
            return 503, "loading the model\n"
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
    parser.add_argument(
        "--served-model-name",
        help=f"the one model {COMPLETIONS_PATH} serves (404 for another); default: any",
    )
    parser.add_argument(
        "--token-seconds",
        type=float,
        default=0.0,
        help="seconds each generated token takes (0: none)",
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--load-seconds",
        type=float,
        metavar="S",
        help="load for S seconds first, reading a file and saying so on stdout (health 503)",
    )
    load.add_argument(
        "--load-wedge",
        action="store_true",
        help="a load that spins a CPU for ever, reading and writing nothing (health 503)",
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
    server.served_model_name = args.served_model_name
    server.token_seconds = args.token_seconds
    if args.load_seconds is not None or args.load_wedge:
        server.loaded.clear()
        load = (
            load_wedged_in_fake_rank
            if args.load_wedge
            else functools.partial(_load_weights, server, args.load_seconds, args.port)
        )
        threading.Thread(target=load, daemon=True).start()
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


def _load_weights(server: FaultServer, seconds: float, port: int) -> None:
    """--load-seconds: read and say how far, for `seconds`; then the rank is loaded."""
    import tempfile  # here: a rank that loads nothing must start fast

    began = time.monotonic()
    read = 0
    # Unlinked at once (O_TMPFILE): nothing is left behind when the rank is killed.
    with tempfile.TemporaryFile(prefix="fake-rank-weights-") as weights:
        weights.write(bytes(LOAD_CHUNK_BYTES))
        weights.flush()
        os.fsync(weights.fileno())  # a dirty page cannot be dropped
        while (elapsed := time.monotonic() - began) < seconds:
            # Dropped from the page cache, so the read reaches the disk: read_bytes in
            # /proc/PID/io counts only that (rchar counts any read, sockets included).
            os.posix_fadvise(weights.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            read += len(os.pread(weights.fileno(), LOAD_CHUNK_BYTES, 0))
            print(
                f"fake rank {port}: loading the model: {read / 2**20:.2f} MiB read, "
                f"{elapsed:.1f}s of {seconds:g}s",
                flush=True,
            )
            time.sleep(min(LOAD_STEP_SECONDS, seconds - elapsed))  # pacing the load
    print(f"fake rank {port}: model loaded in {time.monotonic() - began:.1f}s", flush=True)
    server.loaded.set()


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
