"""The operator socket (``--admin-socket PATH``): actions on a running supervisor.

A Unix domain socket, created 0600 and never on the TCP control plane; a peer that is not
this process's user (SO_PEERCRED) is refused. One request per connection: a JSON line
``{"action": ..., ...}``; one JSON line back, ``{"ok": true, ...}`` or ``{"ok": false,
"error": ...}``. The client is ``trio-dpsup ctl`` (see _ctl).

Actions: ``status``; ``restart`` a rank (the stop procedure, then a start, no backoff);
``drain`` / ``undrain`` a rank (it keeps running; /ranks and /ranks/{r}/ready say not
ready); ``pause-probes`` of a rank for some seconds (a weight reload); ``rolling-restart``
(one rank at a time, each ready again before the next, never below ``min_ready``). Every
action is logged and counted in /metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from ._config.config import SupervisorConfig
from ._errors import ConfigError, RestartRequested
from ._state import Board, RankRecord, RankState
from ._status_doc import status_to_json

__all__ = ["Admin", "bind_admin_socket", "serve_admin"]

logger = logging.getLogger(__name__)

#: A request longer than this is refused.
MAX_REQUEST = 64 * 1024
#: How long a request may take to arrive.
REQUEST_TIMEOUT = 5.0


class AdminError(Exception):
    """A request that cannot be carried out; its message goes back to the client."""


def bind_admin_socket(path: str) -> socket.socket:
    """Bind `path` now, mode 0600, so that a bad path is a ConfigError before any rank
    starts. Made under a temporary name and renamed into place: never visible with wider
    permissions. A stale socket at `path` (nobody listening) is replaced."""
    if os.path.exists(path) and _listening(path):
        raise ConfigError(f"--admin-socket {path}: another supervisor listens there")
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)  # left by a crashed run of this pid
        sock.bind(temporary)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise ConfigError(
            f"--admin-socket {path}: {exc.strerror or exc}: choose a path in a directory "
            "this user can write"
        ) from exc
    sock.listen(16)
    return sock


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


class Admin:
    """Carries out the operator's actions on one supervisor run."""

    def __init__(
        self,
        config: SupervisorConfig,
        board: Board,
        count: Callable[[str], None],
    ) -> None:
        self._config = config
        self._board = board
        self._count = count
        self._rolling = False

    async def act(self, request: dict[str, Any]) -> dict[str, Any]:
        """The answer to one request. **Cancellation**: a rolling restart in progress
        stops between ranks' steps; each rank's own restart goes on."""
        action = request.get("action")
        if action == "status":
            return {"ok": True, "status": status_to_json(self._board.snapshot())}
        handlers = {
            "restart": self._restart,
            "drain": self._drain,
            "undrain": self._undrain,
            "pause-probes": self._pause,
            "rolling-restart": self._rolling_restart,
        }
        handler = handlers.get(str(action))
        if handler is None:
            raise AdminError(f"unknown action {action!r}: one of status, {', '.join(handlers)}")
        if self._board.stopping.is_set():
            raise AdminError("the supervisor is stopping")
        result = await handler(request)
        self._count(str(action))
        return {"ok": True, **result}

    def _record(self, request: dict[str, Any]) -> RankRecord:
        rank = request.get("rank")
        record = self._board.by_rank(rank) if isinstance(rank, int) else None
        if record is None:
            ranks = f"{self._board.ranks[0].plan.rank}-{self._board.ranks[-1].plan.rank}"
            raise AdminError(f"no rank {rank!r} here: the ranks are {ranks}")
        return record

    async def _restart(self, request: dict[str, Any]) -> dict[str, Any]:
        record = self._record(request)
        self._restart_one(record)
        return {"rank": record.plan.rank}

    def _restart_one(self, record: RankRecord) -> None:
        rank = record.plan.rank
        if record.state is not RankState.READY or record.incarnation is None:
            raise AdminError(f"rank {rank} is {record.state.value}: restart a ready rank")
        logger.warning("rank %d: restart requested", rank, extra={"rank": rank})
        record.state = RankState.RESTARTING
        record.last_causes.append(RestartRequested(rank))
        record.restart_now = True
        record.incarnation.cancel()

    async def _drain(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._set_drained(request, True)

    async def _undrain(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._set_drained(request, False)

    def _set_drained(self, request: dict[str, Any], drained: bool) -> dict[str, Any]:
        record = self._record(request)
        record.drained = drained
        self._board.touch()  # /ranks long polls hear of it
        rank = record.plan.rank
        logger.warning(
            "rank %d %s", rank, "drained" if drained else "undrained", extra={"rank": rank}
        )
        return {"rank": rank}

    async def _pause(self, request: dict[str, Any]) -> dict[str, Any]:
        record = self._record(request)
        seconds = request.get("seconds")
        if not isinstance(seconds, int | float) or not 0 <= seconds <= 86400:
            raise AdminError("pause-probes needs SECONDS between 0 and 86400")
        record.probes_paused_until = trio.current_time() + seconds
        logger.warning(
            "rank %d: probes paused for %gs", record.plan.rank, seconds,
            extra={"rank": record.plan.rank},
        )  # fmt: skip
        return {"rank": record.plan.rank, "seconds": seconds}

    async def _rolling_restart(self, request: dict[str, Any]) -> dict[str, Any]:
        board = self._board
        if self._rolling:
            raise AdminError("a rolling restart is already running")
        if board.min_ready > len(board.ranks) - 1:
            raise AdminError(
                f"a rolling restart takes one rank out at a time, below --min-ready "
                f"{board.min_ready}: run the supervisor with --min-ready {len(board.ranks) - 1}"
            )
        self._rolling = True
        try:
            for record in board.ranks:
                await self._wait_ready_count(board.min_ready + 1)
                before = record.restarts
                self._restart_one(record)
                await self._wait(partial(_ready_again, record, before))
        finally:
            self._rolling = False
        return {"ranks": [r.plan.rank for r in board.ranks]}

    async def _wait_ready_count(self, needed: int) -> None:
        await self._wait(
            lambda: sum(r.state is RankState.READY for r in self._board.ranks) >= needed
        )

    async def _wait(self, condition: Callable[[], bool]) -> None:
        """Until `condition` holds, re-checked at each change of the board; bounded by the
        startup timeout (or 30 minutes)."""
        bound = self._config.startup_timeout or 1800
        with trio.move_on_after(bound):
            while not condition():  # each change of the board wakes it
                if self._board.stopping.is_set():
                    raise AdminError("the supervisor began stopping")
                await self._board.changed.wait()
            return
        raise AdminError(f"the rank did not come back within {bound:g}s (--startup-timeout)")


async def serve_admin(
    sock: socket.socket,
    admin: Admin,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `admin` on the bound `sock` until cancelled. Takes ownership of `sock`.

    **Cancellation**: stops at once; requests in progress are dropped.
    """
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        while True:  # ends by cancellation
            stream = await listener.accept()
            nursery.start_soon(_serve_one, stream, admin)


async def _serve_one(stream: trio.SocketStream, admin: Admin) -> None:
    async with stream:
        try:
            _check_peer(stream.socket)
            with trio.move_on_after(REQUEST_TIMEOUT) as arrival:
                request = await _read_request(stream)
            if arrival.cancelled_caught:
                raise AdminError("the request did not arrive in time")
            answer = await admin.act(request)
        except AdminError as exc:
            answer = {"ok": False, "error": str(exc)}
        with contextlib.suppress(trio.BrokenResourceError):  # the client left; it stands
            await stream.send_all(json.dumps(answer).encode() + b"\n")


def _ready_again(record: RankRecord, restarts: int) -> bool:
    return record.restarts > restarts and record.state is RankState.READY


def _check_peer(sock: trio.socket.SocketType) -> None:
    """Refuse a peer that is not this process's user: the file's mode keeps others out
    already; this holds even where the file was made reachable by mistake."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    if uid != os.getuid():
        logger.warning("admin socket: refused pid %d of uid %d", pid, uid)
        raise AdminError(f"uid {uid} is not the supervisor's owner ({os.getuid()})")


async def _read_request(stream: trio.SocketStream) -> dict[str, Any]:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise AdminError(f"a request longer than {MAX_REQUEST} bytes")
    try:
        request = json.loads(data.split(b"\n", 1)[0] or b"null")
    except ValueError as exc:
        raise AdminError(f"not a JSON request: {exc}") from None
    if not isinstance(request, dict):
        raise AdminError('a request is a JSON object, e.g. {"action": "status"}')
    return request
