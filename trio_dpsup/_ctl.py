"""``trio-dpsup ctl``: the operator's client of the admin socket (see _admin).

    trio-dpsup ctl --admin-socket /run/trio-dpsup.sock status
    trio-dpsup ctl --admin-socket /run/trio-dpsup.sock restart 2

Prints one table (status) or one line; an error is one line on stderr and exit status 2.
Standard library only: it runs where the supervisor runs, as the same user.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from ._errors import EXIT_USAGE  # standard library only, as this client

__all__ = ["run_ctl"]

PROG = "trio-dpsup ctl"
#: The socket's path when --admin-socket is not given.
SOCKET_ENV = "TRIO_DPSUP_ADMIN_SOCKET"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Act on a running supervisor.")
    parser.add_argument(
        "--admin-socket",
        metavar="PATH",
        default=os.environ.get(SOCKET_ENV),
        help=f"the supervisor's --admin-socket (default: ${SOCKET_ENV})",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("status", help="a table of the ranks")
    for name, text in (
        ("restart", "restart one rank: its stop procedure, then a start"),
        ("drain", "take a rank out of /ranks and its /ranks/{r}/ready; it keeps running"),
        ("undrain", "put a drained rank back"),
    ):
        actions.add_parser(name, help=text).add_argument("rank", type=int, metavar="RANK")
    pause = actions.add_parser("pause-probes", help="stop probing a rank for a while")
    pause.add_argument("rank", type=int, metavar="RANK")
    pause.add_argument("seconds", type=float, metavar="SECONDS")
    actions.add_parser(
        "rolling-restart",
        help="restart every rank, one at a time, each ready again before the next",
    )
    return parser


def run_ctl(argv: Sequence[str]) -> int:
    """Carry out one action; return the exit status."""
    args = _parser().parse_args(argv)
    if not args.admin_socket:
        return _error(f"no admin socket: pass --admin-socket PATH or set ${SOCKET_ENV}")
    request: dict[str, Any] = {"action": args.action}
    for field in ("rank", "seconds"):
        if hasattr(args, field):
            request[field] = getattr(args, field)
    try:
        answer = _ask(args.admin_socket, request)
    except OSError as exc:
        return _error(
            f"cannot reach the supervisor at {args.admin_socket}: {exc.strerror or exc}: is "
            "it running, with this --admin-socket?"
        )
    if not answer.get("ok"):
        return _error(str(answer.get("error", "the supervisor refused")))
    print(_render(args.action, answer))
    return 0


def _ask(path: str, request: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    if not data:
        raise ConnectionAbortedError(0, "the supervisor closed the connection")
    answer: dict[str, Any] = json.loads(data)
    return answer


def _render(action: str, answer: dict[str, Any]) -> str:
    if action == "status":
        return _table(answer["status"])
    if action == "rolling-restart":
        return f"restarted ranks {', '.join(map(str, answer['ranks']))}, one at a time"
    rank = answer["rank"]
    if action == "pause-probes":
        return f"rank {rank}: probes paused for {answer['seconds']:g}s"
    return f"rank {rank} {'restarting' if action == 'restart' else action + 'ed'}"


def _table(status: dict[str, Any]) -> str:
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
        up = _duration(now - rank["since"]) if rank["state"] == "ready" else "-"
        rows.append((
            str(rank["rank"]), state, str(rank["pid"] or "-"), str(rank["port"]), gpus, last,
            str(rank["restarts"]), up,
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    title = f"{status['state']}, run {status['run_id']}"
    return "\n".join([title, *(line.rstrip() for line in lines)])


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE
