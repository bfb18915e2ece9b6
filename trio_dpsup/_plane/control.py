"""The control plane: the probe, status and metrics endpoints, served by `http_server`.

It listens before any rank is spawned and stops after every rank is gone, so probes always
get an answer that says why (503 with a reason while starting or stopping). GET and HEAD only.
"""

from __future__ import annotations

import json
import logging
import re
import resource
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import parse_qs

import trio

from .._config.concerns import PublishSettings
from .._config.plan import control_connections
from .._config.tls import TlsFiles
from .._errors import ConfigError
from .._state.board import Board
from .._state.document import status_to_json
from .._state.status import RankStatus, SupervisorState, SupervisorStatus
from .discovery import MAX_WAIT, prometheus_targets, ranks_document
from .http_server import Response, serve_http
from .metrics import CONTENT_TYPE
from .peers import GroupMember

__all__ = ["ControlApp", "bind_control_socket", "serve_control_plane"]

logger = logging.getLogger(__name__)

# Nine digits at most: any rank number fits, and int() of a 4000-digit path cannot raise.
_RANK_READY = re.compile(r"^/ranks/(-?\d{1,9})/ready$")
_READY_PATHS = frozenset({"/ready", "/readyz", "/health"})
_ALLOWED = "GET, HEAD"


class ControlApp:
    """Answers the probe, status and discovery endpoints from a fresh snapshot of `board`
    each call, /metrics from `metrics()`, and /ranks (long polls included) and
    /prometheus/targets (see discovery.py) by `config`."""

    def __init__(
        self,
        board: Board,
        metrics: Callable[[], bytes],
        config: PublishSettings,
        group: GroupMember | None = None,
    ) -> None:
        self._board = board
        self._metrics = metrics
        self._config = config
        self._group = group

    async def respond(self, method: str, target: str) -> Response:
        """The answer to `method` `target` (the server leaves out the body of a HEAD).

        **Cancellation**: a long poll of /ranks ends at once; nothing else waits.
        """
        path, _, query = target.partition("?")
        if path == "/ranks" and method in ("GET", "HEAD"):
            return await self._ranks(parse_qs(query))
        if path == "/group" and method == "GET" and self._group is not None:
            # Another member's report, answered as a long poll (peers.py).
            return await self._group.respond(parse_qs(query))
        return Response(*self._route(method, path))

    async def _ranks(self, query: dict[str, list[str]]) -> Response:
        try:
            wait = min(float(query.get("wait", ["0"])[0]), MAX_WAIT)
            version = int(query.get("version", ["-1"])[0])
        except ValueError:
            return Response(400, _TEXT, b"wait is seconds and version a whole number\n")
        if wait > 0 and version == self._board.snapshot().version:
            changed = self._board.changed
            with trio.move_on_after(wait):
                await changed.wait()
        body = json.dumps(ranks_document(self._board.snapshot(), self._config), indent=2) + "\n"
        return Response(200, [(b"content-type", b"application/json")], body.encode())

    def _route(self, method: str, path: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if method not in ("GET", "HEAD"):
            return 405, [(b"allow", _ALLOWED.encode()), *_TEXT], b"method not allowed\n"
        status = self._board.snapshot()
        if path == "/prometheus/targets":
            targets = json.dumps(prometheus_targets(status, self._config), indent=2) + "\n"
            return 200, [(b"content-type", b"application/json")], targets.encode()
        if path == "/livez":
            return 200, _TEXT, b"ok\n"
        if path == "/startupz":
            if status.started:
                return 200, _TEXT, b"ok\n"
            return 503, _TEXT, (_reason(status) + _startup_lines(status)).encode()
        if path in _READY_PATHS:
            if status.ready:
                return 200, _TEXT, b"ok\n"
            return 503, _TEXT, _reason(status).encode()
        if path == "/metrics":
            return 200, [(b"content-type", CONTENT_TYPE.encode())], self._metrics()
        if path == "/status":
            body = json.dumps(status_to_json(status), indent=2).encode() + b"\n"
            return 200, [(b"content-type", b"application/json")], body
        if match := _RANK_READY.match(path):
            return self._rank_ready(status, int(match.group(1)))
        return 404, _TEXT, b"not found\n"

    @staticmethod
    def _rank_ready(
        status: SupervisorStatus, rank: int
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        found = [r for r in status.ranks if r.rank == rank]
        if not found:
            return 404, _TEXT, f"no rank {rank} here\n".encode()
        rank_status = found[0]
        if status.takes_traffic(rank_status):
            return 200, _TEXT, b"ok\n"
        if rank_status.drained:
            return 503, _TEXT, f"rank {rank} is drained\n".encode()
        if rank_status.drain is not None:
            reason = rank_status.drain.reason.value
            return 503, _TEXT, f"rank {rank} is draining for a {reason}\n".encode()
        return 503, _TEXT, f"rank {rank} is {rank_status.state.value}\n".encode()


_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]


def _reason(status: SupervisorStatus) -> str:
    if status.failure is not None:
        return f"{status.state.value}: {status.failure}\n"
    ranks = ", ".join(str(r) for r in status.not_ready())
    if status.ranks_ready and status.members is not None:
        waited = ", ".join(
            f"member {m.member}{'' if m.node is None else f' ({m.node})'} {m.state.value}"
            for m in status.members.not_ready()
        )
        return f"waiting for the group: {waited}\n"
    if status.state is SupervisorState.STARTING:
        return f"starting: ranks not ready: {ranks}\n"
    if status.state is SupervisorState.READY:  # too few ranks serving: restarting, or out
        parts = [f"ranks not ready: {ranks}"] if ranks else []
        out = [f"{r.rank} ({_why_out(r)})" for r in status.ranks if r.ready and r.out]
        if out:
            parts.append(f"ranks taken out: {', '.join(out)}")
        return f"degraded: {'; '.join(parts)}\n"
    return f"{status.state.value}\n"


def _why_out(rank: RankStatus) -> str:
    if rank.drained:
        return "drained"
    if rank.drain is not None:
        return f"draining for a {rank.drain.reason.value}"
    return "failing"


def _startup_lines(status: SupervisorStatus) -> str:
    """What moved last in each starting rank (with ``startup_stall_timeout``), one line each:
    ``rank 1: output lines moved 0.4s ago`` or ``rank 1: nothing moved for 12.0s``."""
    now = time.time()
    lines = []
    for rank in status.ranks:
        startup = rank.startup
        if startup is None or rank.ready:
            continue
        if startup.last_moved is None or startup.last_moved_at is None:
            lines.append(f"rank {rank.rank}: nothing moved for {startup.still_for:.1f}s\n")
        else:
            ago = max(0.0, now - startup.last_moved_at)
            lines.append(f"rank {rank.rank}: {startup.last_moved} moved {ago:.1f}s ago\n")
    return "".join(lines)


def bind_control_socket(host: str, port: int) -> socket.socket:
    """Bind the control plane's socket now, so a taken port is a ConfigError before any rank
    is spawned. Port 0 binds any free port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        return socket.create_server(address, family=family)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on --control-host {host} --control-port {port}: {exc.strerror or exc}"
            ": choose a free port (or 0 for any free port)"
        ) from exc


async def serve_control_plane(
    app: ControlApp,
    sock: socket.socket,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    *,
    tls: TlsFiles | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on `sock` until `shutdown_trigger` returns. Takes ownership of `sock`.

    Calls ``task_status.started(url)`` with the bound address once it accepts connections.
    `tls` serves HTTPS. Connections
    are capped below the open-file limit (see http_server.py).

    **Cancellation**: stops serving at once, dropping open connections.
    """
    sock.listen(1024)
    host, port = sock.getsockname()[:2]
    listener: trio.abc.Listener[trio.abc.Stream] = trio.SocketListener(
        trio.socket.from_stdlib_socket(sock)
    )
    scheme = "http"
    if tls is not None:
        listener = trio.SSLListener(listener, _server_context(tls), https_compatible=True)
        scheme = "https"
    shown = f"[{host}]" if ":" in host else host
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                serve_http,
                app.respond,
                listener,
                shutdown_trigger,
                max_connections=control_connections(soft),
            )
        )
        task_status.started(f"{scheme}://{shown}:{port}")


def _server_context(tls: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.certfile, tls.keyfile)
    context.set_alpn_protocols(["http/1.1"])
    if tls.client_ca is not None:
        context.load_verify_locations(tls.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: clients show a certificate
    return context
