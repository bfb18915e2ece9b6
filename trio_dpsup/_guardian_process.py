"""The guardian program: ``python -m trio_dpsup._guardian_process RUN_ID`` (see _guardian).

Standard library only: about 11 MB resident (bench: "idle: guardian RSS").
"""

from __future__ import annotations

import os
import signal
import sys

from ._cookie import marked

#: Passes over /proc: a process forked while a pass runs is caught by the next one.
_MAX_PASSES = 5


def kill_marked(run_id: str) -> int:
    """SIGKILL every process of run `run_id`'s trees but this one; return how many."""
    killed = 0
    for _ in range(_MAX_PASSES):
        found = 0
        for pid in marked(run_id):
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                found += 1
            except OSError:
                continue  # gone already
        killed += found
        if not found:
            break
    return killed


def main() -> None:
    # Signals meant for the supervisor's terminal or group must not end the guardian early.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run_id = sys.argv[1]
    sys.stdin.buffer.read()  # returns at EOF: the supervisor is done, or dead
    kill_marked(run_id)


if __name__ == "__main__":
    main()
