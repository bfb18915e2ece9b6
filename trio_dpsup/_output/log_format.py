"""How the supervisor's own log records look: text (default) or one JSON object per line,
and how they reach stderr without ever blocking the event loop.

Records about one rank carry ``extra={"rank": n}``; the JSON form has it as a field, so a log
pipeline can group by rank without parsing messages.

A log collector that stops reading (a full stderr pipe) must not stop the supervisor: a
blocked write on the event loop would leave /ready unanswered and signals unhandled. So
records are formatted where they are logged and written by a thread of their own
(`NonBlockingHandler`), through a bounded queue; when it is full, records are dropped,
counted, and the count is written as a record of its own once stderr drains.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import queue
import select
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Generic, TextIO, TypeVar

import trio

T = TypeVar("T")

__all__ = [
    "TEXT_FORMAT",
    "JsonFormatter",
    "NonBlockingHandler",
    "TerminalLine",
    "WriterThread",
    "configure_logging",
    "fd_lock",
    "iso_time",
    "write_whole",
]

_FD_LOCKS: dict[int, threading.RLock] = {}
_FD_LOCKS_LOCK = threading.Lock()


def fd_lock(fd: int) -> threading.RLock:
    """The lock every writer of `fd` holds for a whole record or chunk: our records and the
    ranks' relayed lines share stderr, and a pipe write over PIPE_BUF (4 KiB) is not atomic,
    so without it a record could land in the middle of a rank's line."""
    with _FD_LOCKS_LOCK:
        return _FD_LOCKS.setdefault(fd, threading.RLock())


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def iso_time(seconds: float) -> str:
    """How every JSON line we write gives its time: ISO 8601, UTC, milliseconds."""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """``{"time": ISO 8601 UTC, "level", "logger", "rank" (where there is one), "message"}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
        }
        rank = getattr(record, "rank", None)
        if rank is not None:
            entry["rank"] = rank
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def write_whole(fd: int, data: bytes) -> tuple[int, OSError | None]:
    """Write all of `data` to `fd`, holding `fd_lock(fd)`; for a writer thread, never the
    event loop. A non-blocking `fd` that is full is waited on (select), EINTR retried.
    Returns (0, None), or the bytes left unwritten and the error that stopped the write
    (EPIPE, ENOSPC, EIO...): the caller decides what dropping them means.

    Where a `TerminalLine` is shown on `fd`'s terminal, the write goes above it."""
    with fd_lock(fd):
        line = _shown
        if line is None or fd not in line.fds:
            return _write_all(fd, data)
        with line.lock:
            return _write_all(fd, line.around(data))


def _write_all(fd: int, data: bytes) -> tuple[int, OSError | None]:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])
        except InterruptedError:
            continue
        except OSError as exc:
            return len(view), exc
    return 0, None


#: The TerminalLine on show, if any (there is at most one: the CLI's).
_shown: TerminalLine | None = None

#: Carriage return, then erase to the end of the line (ANSI EL).
_ERASE = b"\r\x1b[K"


class TerminalLine:
    """A line kept at the bottom of a terminal and redrawn in place (``3/8 ranks ready...``).

    While it is shown, every `write_whole` to that terminal (stderr, and stdout where it is
    the same terminal) erases it, writes, and draws it again below what it wrote: records
    and rank lines scroll above it, never into it. Its methods write to the terminal and
    may block (a terminal stopped with Ctrl-S): call them from a thread.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        device = os.fstat(fd).st_rdev
        #: Our descriptors that write to the same terminal.
        self.fds = frozenset(
            other for other in {1, 2, fd} if os.isatty(other) and os.fstat(other).st_rdev == device
        )
        #: Held for each write to the terminal, by whichever descriptor.
        self.lock = threading.RLock()
        self._text = b""
        # Whether the line is drawn where the cursor is; and whether the last write ended
        # mid-line (then the line waits for its newline: erasing would wipe the text out).
        self._drawn = False
        self._midline = False
        self._closed = False
        self._width = 80
        #: Computes the line afresh: called where a record is logged (`renew`), so that the
        #: line drawn below a record already counts what the record says.
        self.refresh: Callable[[], str] | None = None

    @staticmethod
    def usable(fd: int) -> bool:
        """Whether `fd` is a terminal that understands the erase sequence."""
        return os.isatty(fd) and os.environ.get("TERM", "") not in ("", "dumb")

    def show(self, text: str) -> None:
        """Draw `text` (cut to the terminal's width: a wrapped line cannot be redrawn)."""
        global _shown
        width = os.get_terminal_size(self.fd).columns or 80  # 0: the terminal did not say
        with self._everything():
            if self._closed:  # a show abandoned by a cancelled caller, late: not again
                return
            self._width = width
            self._text = text[: max(width - 1, 1)].encode("utf-8", "replace")
            _shown = self
            _write_all(self.fd, self.around(b""))

    def renew(self) -> None:
        """Recompute the text with `refresh`, without drawing (where a record is logged,
        which must never block: no lock is taken; a reference assignment is atomic). A
        refresh that fails (logged from a thread it cannot read from) leaves the text."""
        if self.refresh is None or self._closed or not self._text:
            return
        try:
            text = self.refresh()
        except Exception:
            return
        self._text = text[: max(self._width - 1, 1)].encode("utf-8", "replace")

    def close(self) -> None:
        """Erase the line, for good: a `show` after this draws nothing."""
        global _shown
        with self._everything():
            if self._drawn:
                _write_all(self.fd, _ERASE)
            self._drawn = False
            self._closed = True
            self._text = b""
            _shown = None

    @contextlib.contextmanager
    def _everything(self) -> Iterator[None]:
        """Every writer of the terminal held off, in write_whole's order (the descriptors'
        locks, then `lock`): a writer that has not seen the line yet is not mid-write."""
        with contextlib.ExitStack() as stack:
            for fd in sorted(self.fds):
                stack.enter_context(fd_lock(fd))
            stack.enter_context(self.lock)
            yield

    def around(self, data: bytes) -> bytes:
        """`data` with the line erased before it and drawn again after it (hold `lock`)."""
        before = _ERASE if self._drawn else b""
        if data:
            self._midline = not data.endswith(b"\n")
        self._drawn = bool(self._text) and not self._midline
        return before + data + (self._text if self._drawn else b"")


class WriterThread(Generic[T]):
    """Items sent from the event loop (`send`), written by `write` in a thread of its own:
    a slow reader or disk blocks that thread, never the event loop. The channel holds
    `queue` items; senders wait once it is full. `finish` runs in the thread at the end.
    """

    def __init__(
        self,
        name: str,
        write: Callable[[T], None],
        *,
        queue: int = 64,
        finish: Callable[[], None] | None = None,
    ) -> None:
        self.send, self._receive = trio.open_memory_channel[T | None](queue)
        self._write = write
        self._finish = finish
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._thread.start()

    def _run(self) -> None:
        try:
            while (
                item := trio.from_thread.run(self._receive.receive, trio_token=self._token)
            ) is not None:
                self._write(item)
        finally:
            if self._finish is not None:
                self._finish()

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109
        """Write what is queued, then stop the thread.

        **Cancellation**: shielded, and bounded by `timeout`: a writer that blocks for good
        (a stopped terminal, a hung disk) is abandoned to its daemon thread.
        """
        with trio.CancelScope(shield=True), trio.move_on_after(timeout):
            await self.send.send(None)
            await trio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)


class NonBlockingHandler(logging.Handler):
    """Writes formatted records to `fd` from a thread of its own; never blocks the caller.

    At most `capacity` records wait; more are dropped and counted (`dropped`), and a
    warning saying how many is written before the next record that gets through.
    """

    #: How long `flush` (called at exit) waits for queued records to be written.
    FLUSH_TIMEOUT = 2.0

    def __init__(self, fd: int = 2, capacity: int = 1000) -> None:
        super().__init__()
        self.fd = fd
        #: Records dropped since start because the queue was full.
        self.dropped = 0
        self._unreported = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(capacity)
        self._count_lock = threading.Lock()
        #: Records queued and not yet written; `flush` waits for it to reach 0.
        self._pending = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="trio-dpsup-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        shown = _shown
        if shown is not None:
            # The line drawn below this record is computed now, after what the record says
            # happened ("rank 3 is ready"), not at the line's next redraw.
            shown.renew()
        try:
            line = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            self.handleError(record)
            return
        try:
            with self._idle:
                self._queue.put_nowait(line)
                self._pending += 1
        except queue.Full:
            with self._count_lock:
                self.dropped += 1
                self._unreported += 1

    def flush(self) -> None:
        """Wait, at most FLUSH_TIMEOUT, for what is queued to be written (logging.shutdown
        calls this at exit; `close` does not wait again)."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0, timeout=self.FLUSH_TIMEOUT)

    def _run(self) -> None:
        while (line := self._queue.get()) is not None:
            with self._count_lock:
                unreported, self._unreported = self._unreported, 0
            if unreported:
                write_whole(self.fd, self._dropped_record(unreported))
            # EPIPE, ENOSPC and the like: this record is lost; the next one is tried again.
            write_whole(self.fd, line)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def _dropped_record(self, count: int) -> bytes:
        record = logging.LogRecord(
            "trio_dpsup", logging.WARNING, __file__, 0,
            "%d log records dropped: stderr was not being read", (count,), None,
        )  # fmt: skip
        return (self.format(record) + "\n").encode("utf-8", "backslashreplace")


def configure_logging(level: str, *, json_lines: bool) -> None:
    """Send our records to stderr, as text or (`json_lines`) JSON, without blocking; quiet
    the libraries' per-request lines; and log warnings (a deprecated setting) as records of
    their own, so that they reach whoever reads our log, in its format."""
    handler = NonBlockingHandler()
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    warnings.showwarning = _log_warning
    # One line per probe from httpx would drown the ranks' events.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    logging.getLogger("trio_dpsup").warning("%s", message)
