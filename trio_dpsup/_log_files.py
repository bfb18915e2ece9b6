"""Each rank's lines in a file of its own (``--log-dir``): ``DIR/rank-R.log``, rotated by
size as supervisord's ``stdout_logfile_maxbytes`` and ``_backups`` rotate (``rank-R.log.1`` is
the newest of the old files).

The log pump (_logs) hands every chunk of a rank's lines to `RankFiles` as well as to our
stdout or stderr; one thread writes every file, so a slow disk never blocks the event loop,
and a full channel slows the pumps as a slow stdout does.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import trio

from ._log_format import WriterThread

__all__ = ["CLOSE_TIMEOUT", "LogFiles", "RankFiles"]

logger = logging.getLogger(__name__)

#: How long closing waits for queued lines to be written.
CLOSE_TIMEOUT = 2.0
#: Chunks queued for the writer thread before the pumps wait.
_QUEUE = 64


@dataclass(frozen=True)
class LogFiles:
    """Where and how each rank's lines are also written (`--log-dir`)."""

    directory: str
    max_bytes: int
    backups: int


class _RankFile:
    """One rank's log file, rotated before it passes `max_bytes`: ``rank-R.log`` becomes
    ``rank-R.log.1``, which becomes ``.2``..., and ``.{backups}`` is dropped. For the
    `RankFiles` thread only."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = path
        self._max = max_bytes
        self._backups = backups
        self._fd: int | None = None
        self._size = 0
        #: The error that stopped the last write, until one passes again.
        self.failing: str | None = None

    def write(self, data: bytes) -> None:
        """Append `data` (whole lines), rotating between lines so that no file passes
        `max_bytes` (a line longer than a whole file is cut). A failed write (ENOSPC...)
        raises OSError; the rest of the chunk is lost."""
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
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        self.close()
        if self._backups == 0:
            os.unlink(self.path)
        else:
            for n in range(self._backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(f"{self.path}.{n}", f"{self.path}.{n + 1}")
            os.rename(self.path, f"{self.path}.1")
        self._open()


class RankFiles:
    """Writes each rank's lines to its own file in `directory`, from a thread of its own
    (the disk never blocks the event loop). A failed write is logged once, until writes to
    that file pass again; the lines are still on our stdout and stderr."""

    def __init__(self, files: LogFiles) -> None:
        self._directory = files.directory
        self._max = files.max_bytes
        self._backups = files.backups
        self._files: dict[int, _RankFile] = {}
        self._writer = WriterThread(
            "trio-dpsup-log-dir", self._write, queue=_QUEUE, finish=self._close_files
        )
        self.send = self._writer.send

    def start(self, token: trio.lowlevel.TrioToken) -> None:
        os.makedirs(self._directory, exist_ok=True)
        self._writer.start(token)

    def _close_files(self) -> None:
        for file in self._files.values():
            file.close()

    def _write(self, item: tuple[int, bytes]) -> None:
        rank, chunk = item
        file = self._files.get(rank)
        if file is None:
            path = os.path.join(self._directory, f"rank-{rank}.log")
            file = self._files[rank] = _RankFile(path, self._max, self._backups)
        try:
            file.write(chunk)
        except OSError as exc:
            if file.failing is None:
                logger.warning(
                    "rank %d: lines not written to %s: %s", rank, file.path, exc.strerror or exc,
                    extra={"rank": rank},
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
