"""How a run ended, told to the outside once every rank has stopped: the exit status, the
one final record (the root cause with the failing rank's last lines), and ``--status-file``:
the /status document for whoever looks after the process is gone (systemd's ExecStopPost,
a pod's termination log)."""

from __future__ import annotations

import contextlib
import json
import logging
import os

from .._errors import EXIT_FAILURE
from .._state.board import Board
from .._state.document import status_to_json
from .._state.status import SupervisorStatus

__all__ = ["report_outcome", "write_status_file"]

# The run's own records keep the logger name they had before the split (the README shows it).
logger = logging.getLogger("trio_dpsup._supervisor")


def report_outcome(board: Board, *, killed_now: bool, status_file: str | None) -> int:
    """Mark the board stopped, log how the run ended, write `status_file`; return the exit
    status: the failure's, 1 when a rank had to be killed, else 0. Called after every pump
    has drained, so that the failing rank's last lines are complete."""
    board.finish()
    killed = [r.plan.rank for r in board.ranks if r.killed]
    if board.failure is not None:
        exit_status = board.failure.exit_status
        cause = board.root_cause()
        assert cause is not None
        logger.error("stopped after a failure: %s", cause.report(), extra={"rank": cause.rank})
    elif killed:
        exit_status = EXIT_FAILURE
        when = (
            "at once: a kill was requested (a second signal), skipping the grace period"
            if killed_now
            else "at the end of the grace period"
        )
        logger.error("stopped, but ranks %s had to be killed %s", ", ".join(map(str, killed)), when)
    else:
        exit_status = 0
        logger.info("stopped cleanly")
    if status_file is not None:
        write_status_file(status_file, board.snapshot())
    return exit_status


def write_status_file(path: str, status: SupervisorStatus) -> None:
    """Replace `path` with the /status document, atomically: a reader sees the old file or
    the whole new one. A write error is logged; it must not change how the run ended."""
    body = json.dumps(status_to_json(status), indent=2) + "\n"
    partial_path = f"{path}.{os.getpid()}.tmp"
    try:
        # 0640: it holds the ranks' last stderr lines. O_EXCL and O_NOFOLLOW: a file or link
        # planted at the temporary name is refused, never written through.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial_path)  # left by a crashed run of this pid (unlink: not followed)
        with open(os.open(partial_path, flags, 0o640), "w") as f:
            f.write(body)
        os.replace(partial_path, path)
    except OSError as exc:
        logger.error("cannot write --status-file %s: %s", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(partial_path)
