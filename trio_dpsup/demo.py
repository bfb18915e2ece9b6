"""A demo rank server: ``python -m trio_dpsup.demo --port {port}``.

It stands in for vLLM or SGLang where there is no GPU: it serves its health path (503 until
``--ready-after`` seconds have passed, then 200) and ``/`` (a JSON description of itself,
behind ``--api-key`` when one is given),
and exits with status 0 on SIGTERM or SIGINT. Standard library only, so a rank starts in
tens of milliseconds even on a small machine.

It says what it does on stdout, as a real server would, so that the supervisor's relay,
``--log-dir`` and ``--log-format json`` have lines to show: one line when it listens, and one
per request it answers (``GET / 200``), except its health path, which the supervisor probes
every second. A client that goes away mid-request (a reset at shutdown) is no error.

``--allocate MIB`` takes that much memory on the first GPU it can see, with torch (imported
only then), before it starts serving: a stand-in for an inference server's weights, so that
GPU placement and leftovers can be seen on a real machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

__all__ = ["DemoHandler", "DemoServer", "build_parser", "main"]


class DemoHandler(BaseHTTPRequestHandler):
    server: DemoServer  # set by socketserver; the annotation is for type checkers
    protocol_version = "HTTP/1.1"  # keep-alive, as the prober's client expects
    # Headers and body go out in two writes: with Nagle's algorithm on, the body waits for
    # the client's delayed ACK of the headers, 40 ms on Linux, on a kept-alive connection.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == self.server.health_path:
            status, text = self.server.health()
            self.reply(status, text)
        elif path == "/":
            if not self.server.authorized(self.headers.get("Authorization")):
                self.reply(401, "missing or wrong bearer key\n")
                return
            self.reply(200, json.dumps(self.server.describe()) + "\n", "application/json")
        else:
            self.reply(404, "not found\n")

    def reply(self, status: int, text: str, content_type: str = "text/plain") -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Probes every second would drown the rank's own output: the health path is quiet.
        if self.server.access_log and self.path.split("?", 1)[0] != self.server.health_path:
            say(f"{self.command} {self.path} {code}")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # errors are answered to the client; the access log is log_request's


class DemoServer(ThreadingHTTPServer):
    """The server and the state its handlers read."""

    daemon_threads = True  # a hung handler must not keep the process alive at exit
    handler_class: type[BaseHTTPRequestHandler] = DemoHandler
    #: One line per request answered but the health path's (the demo's main() sets it).
    access_log = False

    def __init__(
        self,
        host: str,
        port: int,
        health_path: str,
        ready_after: float,
        api_key: str | None = None,
    ) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.health_path = health_path
        self.api_key = api_key
        self.ready_at = time.monotonic() + ready_after
        super().__init__((host, port), self.handler_class)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that closed its kept-alive connection with a reset (the supervisor's
        # prober at shutdown) is not this server's error: no traceback for it.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def health(self) -> tuple[int, str]:
        if time.monotonic() < self.ready_at:
            return 503, "loading\n"
        return 200, "ok\n"

    def authorized(self, header: str | None) -> bool:
        return self.api_key is None or header == f"Bearer {self.api_key}"

    def describe(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "port": self.server_address[1],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }


def build_parser(prog: str = "python -m trio_dpsup.demo") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--health-path", default="/health")
    parser.add_argument("--ready-after", type=float, default=0.0, help="seconds of 503 before 200")
    parser.add_argument("--api-key", help="bearer key that / requires, as vLLM (health stays open)")
    parser.add_argument("--ssl-certfile", help="serve HTTPS with this PEM certificate chain")
    parser.add_argument("--ssl-keyfile", help="the private key of --ssl-certfile")
    parser.add_argument(
        "--allocate",
        type=int,
        default=0,
        metavar="MIB",
        help="hold this many MiB on the first visible GPU (needs torch)",
    )
    return parser


def allocate_gpu_memory(mib: int) -> object:
    """Hold `mib` MiB on CUDA device 0 (the first in CUDA_VISIBLE_DEVICES); keep the result."""
    try:
        import torch
    except ImportError:
        sys.exit("--allocate needs torch: pip install torch, or drop --allocate")
    if not torch.cuda.is_available():
        sys.exit("--allocate needs a visible GPU: check CUDA_VISIBLE_DEVICES")
    return torch.empty(mib * 1024 * 1024, dtype=torch.uint8, device="cuda:0")


def say(line: str) -> None:
    """One line on stdout, whole, at once (handler threads write concurrently)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


SignalHandler = Callable[[int, FrameType | None], Any] | int


def exit_cleanly(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)  # unwinds serve_forever() in the main thread, closing the socket


def use_tls(server: DemoServer, certfile: str | None, keyfile: str | None) -> None:
    """Serve HTTPS from now on, when a certificate is given."""
    if certfile is None:
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    server.socket = context.wrap_socket(server.socket, server_side=True)


def serve(
    server: DemoServer,
    on_sigterm: SignalHandler = exit_cleanly,
    on_sigint: SignalHandler = exit_cleanly,
) -> None:
    """Serve until SIGTERM or SIGINT, as the handlers decide (by default: exit 0)."""
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigint)
    with server:
        server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    held = allocate_gpu_memory(args.allocate) if args.allocate else None  # noqa: F841
    server = DemoServer(args.host, args.port, args.health_path, args.ready_after, args.api_key)
    use_tls(server, args.ssl_certfile, args.ssl_keyfile)
    server.access_log = True
    scheme = "https" if args.ssl_certfile else "http"
    host = f"[{args.host}]" if ":" in args.host else args.host
    say(f"demo rank listening on {scheme}://{host}:{args.port} (pid {os.getpid()})")
    serve(server)


if __name__ == "__main__":
    main()
