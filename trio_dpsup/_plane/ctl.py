"""``trio-dpsup ctl``: the operator's client of the admin socket (see admin.py; the
requests and replies are protocol.py's).

    trio-dpsup ctl --admin-socket /run/trio-dpsup/admin.sock status
    trio-dpsup ctl --admin-socket /run/trio-dpsup/admin.sock restart 2 --wait

Prints one table (status; ``--json``: the document) or one line. Exit status, for
scripts: 0 done; 2 refused (a bad request, an action the supervisor declines: the
disruption budget, busy) or no supervisor at the socket; 1 no usable answer (a reply that
is not the protocol's, or none within ``--timeout``). Errors are one line on stderr.
Standard library only: it runs where the supervisor runs, as the same user or root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._errors import EXIT_FAILURE, EXIT_USAGE, ConfigError  # standard library only, as this
from .._output.private_dir import check_socket_dir  # client
from .protocol import Action, ProtocolError, Reply, Request, progress_of

__all__ = ["run_ctl"]

PROG = "trio-dpsup ctl"
#: The socket's path when --admin-socket is not given.
SOCKET_ENV = "TRIO_DPSUP_ADMIN_SOCKET"
#: How long to wait for an answer by default.
DEFAULT_TIMEOUT = 30.0
#: The longest answer read (a status document of many ranks).
MAX_ANSWER = 16 * 2**20


class BadAnswer(Exception):
    """The supervisor's answer could not be used (malformed, or none in time)."""


class Untrusted(Exception):
    """The socket is served by another user: nothing is sent to it, nothing believed."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Act on a running supervisor.")
    parser.add_argument(
        "--admin-socket",
        metavar="PATH",
        default=os.environ.get(SOCKET_ENV),
        help=f"the supervisor's --admin-socket (default: ${SOCKET_ENV})",
    )
    parser.add_argument(
        "--user",
        metavar="USER",
        help="the user the supervisor runs as, when it is not this one (root always is "
        "trusted): a socket served by anyone else, or in a directory they could change, is "
        "refused (e.g. sudo trio-dpsup ctl --user trio-dpsup ...)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="give up when the supervisor has said nothing for this long, exit 1: a long "
        "action (drain, restart --wait, rolling-restart) says how it goes at least every "
        "5 s; what was asked goes on in the supervisor (default: %(default)gs)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print a long action's progress lines on stderr (default: when stderr is a "
        "terminal, as git does)",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="a table of the ranks")
    status.add_argument("--json", action="store_true", help="the status document, as JSON")
    force = "even if fewer than --min-ready ranks would be left serving (/ready then says 503)"
    restart = actions.add_parser("restart", help="restart one rank: its stop, then a start")
    restart.add_argument("rank", type=int, metavar="RANK")
    restart.add_argument("--force", action="store_true", help=force)
    restart.add_argument("--wait", action="store_true", help="until it is ready again")
    _rank_timeout(restart)
    drain = actions.add_parser(
        "drain", help="take a rank out of /ranks and its /ranks/{r}/ready; it keeps running"
    )
    drain.add_argument("rank", type=int, metavar="RANK")
    drain.add_argument("--force", action="store_true", help=force)
    for name, text in (
        ("undrain", "put a drained rank back"),
        ("resume-probes", "probe a rank again now, ending a pause"),
    ):
        actions.add_parser(name, help=text).add_argument("rank", type=int, metavar="RANK")
    pause = actions.add_parser("pause-probes", help="stop probing a rank for a while")
    pause.add_argument("rank", type=int, metavar="RANK")
    pause.add_argument("seconds", type=float, metavar="SECONDS")
    rolling = actions.add_parser(
        "rolling-restart",
        help="restart every rank, at most --max-unavailable at a time, each ready again "
        "before the next",
    )
    rolling.add_argument(
        "--max-unavailable",
        type=int,
        metavar="N",
        help="ranks out at once, even below --min-ready (/ready then says 503) (default: "
        "what --min-ready leaves room for)",
    )
    _rank_timeout(rolling)
    return parser


def _rank_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rank-timeout",
        type=float,
        metavar="SECONDS",
        help="how long a restarted rank may take to be ready again (default: the "
        "supervisor's --startup-timeout)",
    )


def run_ctl(argv: Sequence[str]) -> int:
    """Carry out one action; return the exit status."""
    args = _parser().parse_args(argv)
    if not args.admin_socket:
        return _error(f"no admin socket: pass --admin-socket PATH or set ${SOCKET_ENV}")
    if not args.timeout > 0:
        return _error(f"--timeout must be more than 0 seconds, not {args.timeout:g}")
    action = Action(args.action)
    request = Request(
        action,
        rank=getattr(args, "rank", None),
        seconds=getattr(args, "seconds", None),
        force=getattr(args, "force", False),
        wait=getattr(args, "wait", False),
        max_unavailable=getattr(args, "max_unavailable", None),
        rank_timeout=getattr(args, "rank_timeout", None),
    )
    try:
        trusted = None if args.user is None else _uid(args.user)
        # Another user who can rename a directory on the path can serve a socket of their
        # own there: refuse such a path before a word is sent, as the supervisor does.
        check_socket_dir(args.admin_socket, "--admin-socket", also=trusted)
        show = args.progress if args.progress is not None else sys.stderr.isatty()
        document = _ask(args.admin_socket, request, args.timeout, trusted, _say if show else _quiet)
    except (ConfigError, Untrusted) as exc:
        return _error(str(exc))
    except BadAnswer as exc:
        return _error(str(exc), EXIT_FAILURE)
    except OSError as exc:
        return _error(
            f"cannot reach the supervisor at {args.admin_socket}: {exc.strerror or exc}: is "
            "it running, with this --admin-socket?"
        )
    try:
        reply = Reply.from_json(document)
        if reply.ok:
            reply.check(action)
    except ProtocolError as exc:
        return _error(f"a malformed answer ({exc}): {_shown(document)}", EXIT_FAILURE)
    if not reply.ok:
        assert reply.error is not None
        return _error(reply.error)
    try:
        text = _render(request, reply, as_json=getattr(args, "json", False))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # The status document inside a well-formed reply can still be the wrong shape.
        return _error(f"a malformed answer ({exc!r}): {_shown(document)}", EXIT_FAILURE)
    print(text)
    return 0


def _uid(user: str) -> int:
    """The uid of `user`, a name or a number; ConfigError if there is no such user."""
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        if user.isdigit():
            return int(user)
        raise ConfigError(f"--user {user}: no such user: give the supervisor's user") from None


def _ask(
    path: str,
    request: Request,
    timeout: float,
    trusted: int | None,
    progress: Callable[[str], None],
) -> object:
    """Send `request`, hand each progress line to `progress`, return the answer, parsed
    JSON. Raises OSError when nobody listens at `path`, BadAnswer when a line is not JSON or
    the supervisor says nothing for `timeout` seconds (each progress line resets it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except TimeoutError:
            raise BadAnswer(f"no answer within {timeout:g}s (--timeout): is it stuck?") from None
        _check_peer(sock, path, trusted)
        with contextlib.suppress(BrokenPipeError):
            # The supervisor answered and closed before reading it all: its answer, a
            # refusal, is still there to read.
            sock.sendall(json.dumps(request.to_json()).encode() + b"\n")
        data = b""
        while True:
            line, newline, rest = data.partition(b"\n")
            if newline:
                answer = _parsed(line)
                text = progress_of(answer)
                if text is None:
                    return answer  # its shape is Reply.from_json's to check
                progress(text)
                data = rest
                continue
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                raise BadAnswer(_late(request, timeout)) from None
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_ANSWER:
                raise BadAnswer(f"an answer longer than {MAX_ANSWER} bytes")
    if not data:
        raise BadAnswer("the supervisor closed the connection without an answer")
    answer = _parsed(data.rstrip(_NEWLINE))
    if progress_of(answer) is not None:
        raise BadAnswer("the supervisor closed the connection before its answer")
    return answer


_NEWLINE = b"\n"


def _parsed(data: bytes) -> object:
    try:
        answer: object = json.loads(data)
    except ValueError:
        # Shown with its newline, as it came.
        raise BadAnswer(f"an answer that is not JSON: {_shown(data + _NEWLINE)}") from None
    return answer


def _check_peer(sock: socket.socket, path: str, trusted: int | None) -> None:
    """Raise Untrusted unless the process serving the socket is this user, root or the
    --user given (SO_PEERCRED: the kernel's word, which no file mode can forge)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    if uid not in (os.geteuid(), 0, trusted):
        raise Untrusted(
            f"--admin-socket {path} is served by uid {uid} (pid {pid}), not by this user "
            f"({os.geteuid()}), root or --user: refusing to talk to it; if uid {uid} is the "
            f"supervisor's user, say so with --user {uid}"
        )


def _say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _quiet(text: str) -> None:
    pass


def _late(request: Request, timeout: float) -> str:
    goes_on = ""
    if request.action.outlives_the_request:
        goes_on = f" (the {request.action.value} goes on in the supervisor: see ctl status)"
    return f"no answer within {timeout:g}s (--timeout){goes_on}"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"


def _render(request: Request, reply: Reply, *, as_json: bool) -> str:
    """The operator's line (or table) for a successful `reply` that `Reply.check` passed."""
    action = request.action
    if action is Action.STATUS:
        assert reply.status is not None
        if as_json:
            return json.dumps({"status": reply.status, "operation": reply.operation}, indent=2)
        return _table(reply.status, reply.operation)
    if action is Action.ROLLING_RESTART:
        assert reply.ranks is not None
        line = f"restarted ranks {_list(reply.ranks)}, at most {reply.max_unavailable} "
        line += "out at a time"
        for skipped in reply.skipped:
            line += f"; skipped rank {skipped.rank}: {skipped.why}"
        return line
    rank = reply.rank
    if action is Action.PAUSE_PROBES:
        return f"rank {rank}: probes paused for {reply.seconds:g}s"
    if action is Action.RESUME_PROBES:
        return f"rank {rank}: probes resumed"
    if action is Action.RESTART:
        return f"rank {rank} {'ready again' if request.wait else 'restarting'}"
    return f"rank {rank} {action.value}ed"


def _list(ranks: Sequence[int]) -> str:
    return ", ".join(map(str, ranks)) or "none"


def _table(status: Mapping[str, Any], operation: str | None) -> str:
    now = time.time()
    header = ("RANK", "STATE", "PID", "PORT", "GPUS (MIB USED)", "LAST PROBE", "RESTARTS", "UP")
    rows = [header]
    for rank in status["ranks"]:
        gpus = (
            " ".join(
                f"{g['index']}({g['memory_used_mib'] if g['memory_used_mib'] is not None else '?'})"
                for g in rank["gpus"]
            )
            or ",".join(rank["devices"])
            or "-"
        )
        probe = rank["last_probe"]
        last = "-" if probe is None else (
            f"{probe['latency_ms']:.1f} ms" if probe["ok"] else str(probe["error"])
        )  # fmt: skip
        state = rank["state"] + (" (drained)" if rank.get("drained") else "")
        drain = rank.get("drain")
        if drain is not None and drain["end"] is None:
            inflight = drain["inflight"]
            count = "?" if inflight is None else f"{inflight:g}"
            state += f" (draining for a {drain['reason']}: {count} in flight)"
        paused = rank.get("probes_paused_until")
        if paused is not None:
            state += f" (probes paused {_duration(paused - now)})"
        up = _duration(now - rank["since"]) if rank["state"] == "ready" else "-"
        rows.append((
            str(rank["rank"]), state, str(rank["pid"] or "-"), str(rank["port"]), gpus, last,
            str(rank["restarts"]), up,
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    title = f"{status['state']}, run {status['run_id']}"
    if operation is not None:
        title += f"; {operation}"
    routers = [
        f"router {r['name']}: lists ranks {_list(r['listed'])}"
        + ("" if r["problem"] is None else f"; failing: {r['problem']}")
        for r in status.get("routers", ())
    ]
    return "\n".join([title, *(line.rstrip() for line in lines), *routers])


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _error(message: str, status: int = EXIT_USAGE) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status
