"""Startup by progress: a starting rank whose work toward ready stops is failed before the
wall-clock startup deadline, which stays as the ceiling.

A model load moves: its processes read weights from storage (``read_bytes`` of
/proc/PID/io, summed over the rank's tree), its GPUs' memory grows (NVML's readings, which
the GPU watch takes every ``--gpu-interval``), it writes lines (the log pump counts them).
A wedged load moves none of them for `startup_stall_timeout` seconds: `StartupStalled`.
CPU time is not progress: a collective that waits for a peer spins a core.

What it cannot see: a load from the page cache through mmap (no read, no syscall), with no
output and no GPU (a CPU engine loading a cached model quietly). Keep the timeout above
the longest quiet stretch of a healthy load; it is off by default.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable

import psutil
import trio

from .._config.concerns import ProbeSettings
from .._errors import StartupStalled
from .._state.board import RankRecord
from .._state.status import RankState, StartupProgress

__all__ = ["StartupWatch", "read_bytes_of", "watch_startup"]

#: The longest gap between readings; shorter for a short timeout (a quarter of it).
MAX_READING_INTERVAL = 1.0


def read_bytes_of(pids: Iterable[int]) -> dict[int, int]:
    """Each process's bytes read from storage (/proc/PID/io read_bytes), where readable."""
    found: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error, OSError):
            found[pid] = int(psutil.Process(pid).io_counters().read_bytes)
    return found


class StartupWatch:
    """What moved last while a rank starts, from its readings."""

    def __init__(self, started: float) -> None:
        self._since = started  # trio.current_time() of the last move (or the start)
        self._bytes: dict[int, int] = {}
        self._gpu: int | None = None
        self._lines: int | None = None
        self.last_moved: str | None = None
        self.last_moved_at: float | None = None

    def observe(
        self, now: float, read_bytes: dict[int, int], gpu_memory: int | None, lines: int
    ) -> float:
        """Seconds with nothing moving, as of the reading taken at `now`."""
        moved = []
        # Per process: a process that exits takes its count with it, which is no move back.
        if any(count > self._bytes.get(pid, 0) for pid, count in read_bytes.items()):
            moved.append("bytes read")
        self._bytes = {
            pid: max(count, self._bytes.get(pid, 0)) for pid, count in read_bytes.items()
        }
        if gpu_memory is not None:
            if self._gpu is not None and gpu_memory > self._gpu:
                moved.append("GPU memory")
            self._gpu = gpu_memory if self._gpu is None else max(self._gpu, gpu_memory)
        if self._lines is not None and lines > self._lines:
            moved.append("output lines")
        self._lines = lines
        if moved:
            self._since = now
            self.last_moved = ", ".join(moved)
            self.last_moved_at = time.time()
        return now - self._since

    def describe(self, started_wall: float) -> str:
        """What moved last, for the failure's message."""
        if self.last_moved is None or self.last_moved_at is None:
            return "nothing, since the process started"
        return f"{self.last_moved}, {self.last_moved_at - started_wall:.1f}s after the start"


async def watch_startup(
    config: ProbeSettings,
    record: RankRecord,
    pids: Callable[[], Awaitable[set[int]]],
) -> None:
    """While one rank process starts, read what moves; raise `StartupStalled` once nothing
    has for `startup_stall_timeout`. Returns once the rank is ready (or at once when the
    check is off).

    **Cancellation**: prompt.
    """
    timeout = config.startup_stall_timeout
    if not timeout:
        return
    interval = min(MAX_READING_INTERVAL, timeout / 4)
    started_wall = time.time()
    watch = StartupWatch(trio.current_time())
    while record.state is RankState.STARTING:  # ends once ready, or by the failure it raises
        tree = await pids()
        read = await trio.to_thread.run_sync(read_bytes_of, tree)
        samples = record.gpu_samples
        gpu = sum(s.memory_used for s in samples) if samples else None
        now = trio.current_time()
        still = watch.observe(now, read, gpu, record.output.lines)
        record.note_startup(
            StartupProgress(
                read_bytes=sum(read.values()) if read else None,
                gpu_memory=gpu,
                lines=record.output.lines,
                last_moved=watch.last_moved,
                last_moved_at=watch.last_moved_at,
                still_for=still,
            )
        )
        if still >= timeout:
            raise StartupStalled(record.plan.rank, still, watch.describe(started_wall))
        await trio.sleep(min(interval, timeout - still))
