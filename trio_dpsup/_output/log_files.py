"""Each rank's lines in a file of its own (``--log-dir``): ``DIR/rank-R.log``, rotated by
size as supervisord's ``stdout_logfile_maxbytes`` and ``_backups`` rotate (``rank-R.log.1`` is
the newest of the old files).

The directory is trusted the way logrotate and OpenSSH's ``StrictModes`` trust one, because
the supervisor often runs as root and a log directory may sit where others can write:

* `open_log_dir` creates DIR (0750) when it is missing, and refuses (a ConfigError, before
  anything starts) one that is a symbolic link, is not owned by our user, or can be written
  by others, or by a group other than our own (private_dir.py). Every later open and rename
  goes through the descriptor of the directory it checked, so a path swapped afterwards is
  never followed.
* Each file is opened with ``O_NOFOLLOW | O_NONBLOCK`` (a planted link is not followed; a
  planted FIFO cannot block the open) and kept only if ``fstat`` says it is a regular file,
  at every open, rotation included. New files are 0640: they hold what ranks print.

The log pump (pump.py) hands every chunk of a rank's lines to `RankFiles` as well as to our
stdout or stderr. One thread writes every file, so a slow disk never blocks the event loop;
and the queue to it never blocks the pump either: when it is full the chunk is dropped for
the file alone, counted (`RankOutput.file_dropped_lines`, in /metrics), and said once in the
log. Our stdout and stderr stay lossless whatever the files do.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from dataclasses import dataclass

import trio

from .log_format import WriterThread
from .private_dir import open_private_dir

__all__ = ["CLOSE_TIMEOUT", "DIR_MODE", "FILE_MODE", "LogFiles", "RankFiles", "open_log_dir"]

logger = logging.getLogger(__name__)

#: How long closing waits for queued lines to be written.
CLOSE_TIMEOUT = 2.0
#: Chunks queued for the writer thread; more are dropped for the files (never for stdout).
_QUEUE = 256
#: A new log directory: ours, our group may read.
DIR_MODE = 0o750
#: A new rank log file: ours, our group may read; what ranks print may be sensitive.
FILE_MODE = 0o640
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


@dataclass(frozen=True)
class LogFiles:
    """Where and how each rank's lines are also written (`--log-dir`)."""

    directory: str
    max_bytes: int
    backups: int


def open_log_dir(path: str, option: str = "--log-dir") -> int:
    """A descriptor of the log directory `path`, created (DIR_MODE) when missing, once it
    is found safe to write in (private_dir.py). Raises ConfigError, naming the fix."""
    return open_private_dir(path, option, DIR_MODE)


#: Why an open was refused, by errno: what was planted at the file's name.
_REFUSED = {
    errno.ELOOP: "a symbolic link, not followed: lines go only to our stdout and stderr",
    errno.ENXIO: "a FIFO or a device, not a regular file: lines go only to our stdout and stderr",
}


class _RankFile:
    """One rank's log file, rotated before it passes `max_bytes`: ``rank-R.log`` becomes
    ``rank-R.log.1``, which becomes ``.2``..., and ``.{backups}`` is dropped. For the
    `RankFiles` thread only; names are relative to the directory's descriptor."""

    def __init__(self, dir_fd: int, name: str, max_bytes: int, backups: int) -> None:
        self.name = name
        self._dir = dir_fd
        self._max = max_bytes
        self._backups = backups
        self._fd: int | None = None
        self._size = 0
        #: The error that stopped the last write, until one passes again.
        self.failing: str | None = None

    def write(self, data: bytes) -> None:
        """Append `data` (whole lines), rotating between lines so that no file passes
        `max_bytes` (a line longer than a whole file is cut). A failed write (ENOSPC, a
        planted FIFO...) raises OSError; the rest of the chunk is lost."""
        if self._fd is None:
            self._open()
        while data:
            room = max(self._max - self._size, 0)  # a file left larger by an earlier run: 0
            if len(data) <= room:
                self._append(data)
                return
            cut = data.rfind(b"\n", 0, room) + 1  # the whole lines that fit
            if cut == 0 and self._size == 0:
                cut = room
            if cut:
                self._append(data[:cut])
                data = data[cut:]
            self._rotate()

    def _append(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            self._size += written
            view = view[written:]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> None:
        try:
            fd = os.open(self.name, _OPEN_FLAGS, FILE_MODE, dir_fd=self._dir)
        except OSError as exc:
            why = _REFUSED.get(exc.errno or 0)
            if why is None:
                raise
            raise OSError(exc.errno, why) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise OSError(0, "not a regular file: lines go only to our stdout and stderr")
        # Regular files never block; the flag was only for the open (a FIFO's).
        os.set_blocking(fd, True)
        self._fd = fd
        self._size = info.st_size

    def _rotate(self) -> None:
        self.close()
        if self._backups == 0:
            os.unlink(self.name, dir_fd=self._dir)
        else:
            for n in range(self._backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    self._rename(f"{self.name}.{n}", f"{self.name}.{n + 1}")
            self._rename(self.name, f"{self.name}.1")
        self._open()

    def _rename(self, old: str, new: str) -> None:
        os.rename(old, new, src_dir_fd=self._dir, dst_dir_fd=self._dir)


class RankFiles:
    """Writes each rank's lines to its own file in the directory, from a thread of its own
    (the disk never blocks the event loop, and a full queue never blocks the pump: see the
    module doc). A failed write is logged once, until writes to that file pass again; the
    lines are still on our stdout and stderr."""

    def __init__(self, files: LogFiles, dir_fd: int) -> None:
        self.directory = files.directory
        self._dir = dir_fd
        self._max = files.max_bytes
        self._backups = files.backups
        self._files: dict[int, _RankFile] = {}
        self._writer = WriterThread(
            "trio-dpsup-log-dir", self._write, queue=_QUEUE, finish=self._close_files
        )
        self._dropping: set[int] = set()

    def start(self, token: trio.lowlevel.TrioToken) -> None:
        self._writer.start(token)

    def offer(self, rank: int, chunk: bytes) -> bool:
        """Queue `chunk` for rank `rank`'s file, or drop it if the writer is behind; True if
        it was queued. Never waits. The first drop of a run of drops is logged."""
        try:
            self._writer.send.send_nowait((rank, chunk))
        except trio.WouldBlock:
            if rank not in self._dropping:
                self._dropping.add(rank)
                logger.warning(
                    "rank %d: lines dropped from %s/rank-%d.log: its writer is behind (a slow "
                    "or blocked disk); they are on our output still, and counted in "
                    "trio_dpsup_log_file_dropped_lines_total",
                    rank, self.directory, rank, extra={"rank": rank},
                )  # fmt: skip
            return False
        self._dropping.discard(rank)
        return True

    def _close_files(self) -> None:
        for file in self._files.values():
            file.close()
        os.close(self._dir)

    def _write(self, item: tuple[int, bytes]) -> None:
        rank, chunk = item
        file = self._files.get(rank)
        if file is None:
            file = _RankFile(self._dir, f"rank-{rank}.log", self._max, self._backups)
            self._files[rank] = file
        try:
            file.write(chunk)
        except OSError as exc:
            if file.failing is None:
                logger.warning(
                    "rank %d: lines not written to %s/%s: %s", rank, self.directory, file.name,
                    exc.strerror or exc, extra={"rank": rank},
                )  # fmt: skip
            file.failing = exc.strerror or str(exc)
            file.close()  # opened afresh for the next chunk (the disk may have room again)
        else:
            file.failing = None

    async def close(self) -> None:
        """Write what is queued, close the files.

        **Cancellation**: shielded, and bounded by CLOSE_TIMEOUT (a disk that hangs is
        abandoned to the daemon thread).
        """
        await self._writer.close(CLOSE_TIMEOUT)
