"""A rank that exits at once for the first LIMIT starts of every rank together (counted in
COUNT_FILE), then serves as the fake rank does: ``python -m bench.churn_rank COUNT_FILE
LIMIT FAKE_RANK_ARGS...``. It makes a supervisor restart ranks thousands of times, as a
crash-looping engine would, before the idle cost is measured."""

from __future__ import annotations

import fcntl
import os
import sys


def main() -> None:
    count_file, limit, *rest = sys.argv[1:]
    with open(count_file, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        count = int(f.read() or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(str(count))
    if count <= int(limit):
        os._exit(1)
    os.execv(sys.executable, [sys.executable, "-m", "trio_dpsup.testing.fake_rank", *rest])


if __name__ == "__main__":
    main()
