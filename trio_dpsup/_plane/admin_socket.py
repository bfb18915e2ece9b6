"""The admin socket (``--admin-socket PATH``): a Unix domain socket, created 0600 and never
on the TCP control plane, that carries the operator's requests to `Admin` (admin.py).

A peer that is not this process's user or root (SO_PEERCRED) is refused, once its request
has arrived (so that its write lands and it reads why). One request per connection: a
JSON line ``{"action": ..., ...}``; one JSON line back, ``{"ok": true, ...}``
or ``{"ok": false, "error": ...}``, as protocol.py types them, after the progress lines of a
long action.

The socket cannot stop the supervisor: a request is bounded in size, nesting and time
before it is parsed, any failure while carrying it out is that request's error reply,
``accept()`` errors back off and retry, and at most `MAX_CONNECTIONS` are served at once
(the excess told "busy" and closed at once); a client that has not sent its request line
within `LINE_TIMEOUT` is dropped, so idle clients cannot hold every slot.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .._errors import ConfigError
from .._output.private_dir import check_socket_dir
from .admin import Admin, AdminError
from .protocol import ProtocolError, Reply, Request, progress_line

__all__ = ["AdminSocket", "bind_admin_socket", "serve_admin"]

logger = logging.getLogger("trio_dpsup.admin")

#: A request longer than this is refused (a request is a few dozen bytes).
MAX_REQUEST = 4096
#: JSON nesting a request may have: requests are flat objects.
MAX_DEPTH = 4
#: How long a request's line may take to arrive: ctl sends it at once; a client that holds
#: a connection and says nothing is dropped, so that idle clients cannot hold every slot.
LINE_TIMEOUT = 1.0
#: How long writing an answer to a client may take (one that never reads is dropped).
REQUEST_TIMEOUT = 5.0
#: Connections served at once; more are closed as soon as they are accepted.
MAX_CONNECTIONS = 32
#: How long `bind_admin_socket` waits for whoever may listen at the path to answer.
LIVENESS_TIMEOUT = 0.5
#: Progress lines waiting for a slow client; more are dropped (the reply never is).
PROGRESS_QUEUE = 64
#: After an accept() error (EMFILE...): the first wait, doubled up to the second.
ACCEPT_BACKOFF = (0.05, 1.0)


@dataclass(frozen=True)
class AdminSocket:
    """A bound admin socket and the identity of its file, so that only that file is
    removed at exit (not whatever another process put at the path since)."""

    sock: socket.socket
    path: str
    device: int
    inode: int

    def remove(self) -> None:
        """Unlink the path if it is still our socket."""
        with contextlib.suppress(OSError):
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == (self.device, self.inode):
                os.unlink(self.path)


def bind_admin_socket(path: str) -> AdminSocket:
    """Bind `path` now, mode 0600, so that a bad path is a ConfigError before any rank
    starts. Made under a temporary name and renamed into place: never visible with wider
    permissions. A stale socket at `path` (nobody listening) is replaced; a live one, a
    symbolic link, a regular file or anything else is refused, never replaced; so is a
    directory on the path that another user owns or others can write (private_dir.py)."""
    check_socket_dir(path, "--admin-socket")
    _check_existing(path)
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)  # left by a crashed run of this pid
        sock.bind(temporary)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
        info = os.lstat(path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise ConfigError(
            f"--admin-socket {path}: {exc.strerror or exc}: choose a path in a directory "
            "this user can write"
        ) from exc
    sock.listen(16)
    return AdminSocket(sock, path, info.st_dev, info.st_ino)


def _check_existing(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"--admin-socket {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISSOCK(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a socket"
        raise ConfigError(
            f"--admin-socket {path} exists and is {kind}: it is never replaced; remove it, "
            "or choose a path in a private directory (systemd: RuntimeDirectory=)"
        )
    if _listening(path):
        raise ConfigError(
            f"--admin-socket {path}: another process listens there (another supervisor?): "
            "stop it, or choose another path"
        )


def _listening(path: str) -> bool:
    """Whether something accepts connections at the socket `path`. A listener with a full
    backlog counts as one (the connect would wait): it is not stale."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(LIVENESS_TIMEOUT)
        try:
            probe.connect(path)
        except (TimeoutError, BlockingIOError):
            return True
        except OSError as exc:
            return exc.errno == errno.EAGAIN  # a full backlog, as Linux says it
    return True


async def serve_admin(
    admin_socket: AdminSocket,
    admin: Admin,
    shutdown_trigger: Callable[[], Awaitable[object]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `admin` on the bound socket until `shutdown_trigger` returns (the control
    plane's, so both stop last); then remove the socket's file if it is still ours. Takes
    ownership of the socket.

    **Cancellation**: stops at once, dropping requests in progress; the file is removed.
    """
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve, admin_socket, admin)
            task_status.started()
            await shutdown_trigger()
            nursery.cancel_scope.cancel()
    finally:
        admin_socket.remove()


async def _serve(
    admin_socket: AdminSocket,
    admin: Admin,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(admin_socket.sock))
    serving = 0

    async def serve_one(stream: trio.SocketStream) -> None:
        nonlocal serving
        try:
            await _serve_one(stream, admin)
        finally:
            serving -= 1

    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        backoff = ACCEPT_BACKOFF[0]
        while True:  # ends by cancellation
            try:
                stream = await listener.accept()
            except OSError as exc:
                # EMFILE, ENFILE, ENOBUFS: the connection waits in the backlog; so do we,
                # rather than spin or stop.
                if backoff == ACCEPT_BACKOFF[0]:
                    logger.warning("admin socket: accept failed: %s; retrying", exc)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF[1])
                continue
            backoff = ACCEPT_BACKOFF[0]
            if serving >= MAX_CONNECTIONS:
                nursery.start_soon(_refuse_busy, stream)
                continue
            serving += 1
            nursery.start_soon(serve_one, stream)


async def _refuse_busy(stream: trio.SocketStream) -> None:
    """Tell a client past MAX_CONNECTIONS why it is refused (briefly), then close."""
    answer = Reply.refusal(
        f"busy: all {MAX_CONNECTIONS} admin connections are taken; try again (a client that "
        f"says nothing is dropped after {LINE_TIMEOUT:g}s)"
    )
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        with trio.move_on_after(0.1):  # a refusal is not worth waiting on
            await stream.send_all(json.dumps(answer.to_json()).encode() + b"\n")
    await trio.aclose_forcefully(stream)


async def _serve_one(stream: trio.SocketStream, admin: Admin) -> None:
    async with stream:
        try:
            # The line is read before the peer is checked, so that a refused peer's own
            # write has landed when the refusal comes: answered first and closed on, it
            # would meet EPIPE on its write and never read why.
            arrived: bytes | AdminError
            try:
                arrived = await _read_line(stream)
            except AdminError as exc:
                arrived = exc
            _check_peer(stream.socket)  # a stranger hears only that it is one
            if isinstance(arrived, AdminError):
                raise arrived
            answer = await _act_saying_progress(stream, admin, _parse(arrived))
        except (AdminError, ProtocolError) as exc:
            answer = Reply.refusal(str(exc))
        except Exception as exc:
            # A bug must cost this request, never the supervisor (and its ranks).
            logger.exception("admin socket: a request failed")
            answer = Reply.refusal(f"internal error: {type(exc).__name__}: {exc}")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            with trio.move_on_after(REQUEST_TIMEOUT):  # a client that never reads
                await stream.send_all(json.dumps(answer.to_json()).encode() + b"\n")


async def _act_saying_progress(stream: trio.SocketStream, admin: Admin, request: Request) -> Reply:
    """Carry out `request`, writing its progress lines to `stream` as they come. A client
    that stops reading loses its lines (never more than PROGRESS_QUEUE wait), not the
    action."""
    send, receive = trio.open_memory_channel[str](PROGRESS_QUEUE)

    def progress(text: str) -> None:
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            send.send_nowait(text)

    async def write() -> None:
        async with receive:
            async for text in receive:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    with trio.move_on_after(REQUEST_TIMEOUT):  # a client that never reads
                        await stream.send_all(json.dumps(progress_line(text)).encode() + b"\n")

    answer: Reply | Exception
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        async with send:
            try:
                answer = await admin.act(request, progress)
            except Exception as exc:  # raised below, as itself, not in the nursery's group
                answer = exc
    if isinstance(answer, Exception):
        raise answer
    return answer


def _check_peer(sock: trio.socket.SocketType) -> None:
    """Refuse a peer that is neither this process's user nor root: the file's mode keeps
    others out already; this holds even where the file was made reachable by mistake.
    Root is let in as it is to the file itself, so ``sudo trio-dpsup ctl`` works against a
    supervisor run as a service user."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    if uid not in (os.getuid(), 0):
        logger.warning("admin socket: refused pid %d of uid %d", pid, uid)
        raise AdminError(f"uid {uid} is neither the supervisor's owner ({os.getuid()}) nor root")


async def _read_line(stream: trio.SocketStream) -> bytes:
    """The request's line, unparsed: at most `MAX_REQUEST` bytes within `LINE_TIMEOUT`,
    whoever sends. Raises AdminError past either bound."""
    data = b""
    with trio.move_on_after(LINE_TIMEOUT) as arrival:
        while b"\n" not in data:
            chunk = await stream.receive_some(MAX_REQUEST + 1)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REQUEST:
                raise AdminError(f"a request longer than {MAX_REQUEST} bytes")
    if arrival.cancelled_caught:
        raise AdminError("the request did not arrive in time")
    return data.split(b"\n", 1)[0]


def _parse(line: bytes) -> Request:
    if _depth(line) > MAX_DEPTH:
        raise AdminError(f"a request nested deeper than {MAX_DEPTH} levels")
    try:
        document = json.loads(line or b"null")
    except ValueError as exc:
        raise AdminError(f"not a JSON request: {exc}") from None
    return Request.from_json(document)


def _depth(data: bytes) -> int:
    """How deeply the arrays and objects of the JSON text `data` nest, without parsing it
    (the parser recurses: a few thousand ``[`` would raise RecursionError)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest
