"""A rank that writes log lines as fast as it can: ``python -m bench.log_writer OUT SECONDS``.

Writes 128-byte lines to stdout for SECONDS (or until SIGTERM), then ``LINES ELAPSED`` to OUT.
"""

from __future__ import annotations

import signal
import sys
import time
from types import FrameType

LINE = b"x" * 127 + b"\n"  # 128 bytes a line, as written by the rank (before any prefix)
_stop = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _stop
    _stop = True


def main() -> None:
    out, seconds = sys.argv[1], float(sys.argv[2])
    signal.signal(signal.SIGTERM, _on_sigterm)
    stdout = sys.stdout.buffer
    batch = LINE * 64
    lines = 0
    start = time.monotonic()
    deadline = start + seconds
    while not _stop and time.monotonic() < deadline:
        stdout.write(batch)  # blocks when the pipe is full: that is the back-pressure measured
        lines += 64
    elapsed = time.monotonic() - start
    with open(out, "w") as f:
        f.write(f"{lines} {elapsed}")
    stdout.flush()


if __name__ == "__main__":
    main()
