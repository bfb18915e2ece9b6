"""The log pump: every line a rank writes goes out on our stdout or stderr, prefixed with its
rank, and nothing is lost.

* Each rank's stdout and stderr are pipes; one task per pipe reads them as bytes (so bytes
  that are not UTF-8 pass through untouched), prefixes each line and hands whole lines on.
* Writing to our own stdout/stderr happens in one thread per stream (`_Sink`): a slow
  reader of our output (a terminal, a log collector) blocks that thread, never the event
  loop. The channel to it is bounded, so a rank is slowed by a slow reader only once its own
  pipe buffer is full, as it would be writing to that reader directly.
* A pipe is read until EOF, which comes when the rank's whole tree is gone: the lines written
  just before a crash are all there, and a last line without a newline gets one. A tree
  member that escaped the kill would hold the pipe open forever, so after the rank has
  stopped, the wait for EOF is bounded (`DRAIN_TIMEOUT`).
* A line is relayed in pieces of at most `MAX_LINE` bytes: a rank that writes 100 MB with
  no newline costs a bounded buffer and linear time, not a 100 MB line built by repeated
  concatenation. The stderr tail keeps at most `TAIL_LINE_CHARS` of each line.
* A failed write to our stdout or stderr (ENOSPC, EIO, a non-blocking descriptor that is
  full) is retried with the next chunk, and once writes pass again a line says how many
  bytes were dropped and why; EAGAIN waits for room instead of dropping anything.
* The last lines of each rank's stderr are kept for the root-cause report.
* With a log directory (`--log-dir`), each rank's lines also go to a file of its own,
  ``rank-R.log``, rotated by size, written by one more thread (`RankFiles`). The files never
  slow the pump: lines the file writer cannot take in time are dropped for the file alone
  and counted (`RankOutput.file_dropped_lines`).
* On a terminal, control characters in rank lines (ESC, CR, ...) are shown escaped
  (``\x1b``): a rank must not be able to move the cursor, rewrite earlier lines or retitle
  the operator's terminal. Pipes, files and JSON get the bytes as written.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from .log_files import LogFiles, RankFiles
from .log_format import WriterThread, iso_time, write_whole
from .redact import redact_text

__all__ = ["DRAIN_TIMEOUT", "TAIL_LINES", "LogFiles", "LogPump", "RankOutput", "open_log_pump"]

#: After a rank has stopped, how long its pipes may stay open (held by an escaped process).
DRAIN_TIMEOUT = 2.0
#: Lines of each rank's stderr kept for the root-cause report.
TAIL_LINES = 20
#: Lines of both streams kept for a failure's evidence, each cut at RECENT_LINE_BYTES.
RECENT_LINES = 300
RECENT_LINE_BYTES = 2048
#: The longest line relayed as one; longer ones go out in pieces of this size.
MAX_LINE = 65536
#: What the stderr tail keeps of each line.
TAIL_LINE_CHARS = 500
#: Chunks queued for one output stream before the pumps wait (and then the ranks' pipes fill).
_SINK_QUEUE = 64
_READ_SIZE = 65536
#: ANSI colours for rank prefixes on a terminal, cycled by rank.
_COLOURS = (36, 33, 35, 32, 34, 31)


class _Pipes:
    """The pipes of one process of a rank (a restarted rank has one of these per process)."""

    def __init__(self) -> None:
        self.drained = trio.Event()  # set once both pipes reached EOF
        self._open = 0

    def opened(self) -> None:
        self._open += 1

    def closed(self) -> None:
        self._open -= 1
        if self._open <= 0:
            self.drained.set()


class RankOutput:
    """What the pump keeps of one rank's output: the tail of its stderr (over all of its
    processes, so a restart does not hide what came before), its last lines of both streams
    for the evidence of a failure (kept as bytes: decoded only if they are ever written),
    and its current pipes.

    What it keeps is as the rank wrote it; what it hands out (`tail`, `recent_text`) has
    secrets redacted, as everything we serve or write does: a rank that prints its API key
    must not have it served on /status. Redacting when read, not per line, keeps a rank that
    floods its stderr from paying for it."""

    def __init__(self) -> None:
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.recent: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=RECENT_LINES)
        self.pipes = _Pipes()
        #: Lines not written to the rank's --log-dir file because its writer was behind.
        self.file_dropped_lines = 0
        #: Lines read from both streams, over all of its processes (startup progress).
        self.lines = 0

    def tail(self) -> tuple[str, ...]:
        """The last lines of its stderr, oldest first, secrets redacted."""
        return tuple(redact_text(line) for line in self.stderr_tail)

    def recent_text(self) -> str:
        """The last lines of both streams, oldest first, each marked with its stream,
        secrets redacted."""
        return redact_text(
            "".join(
                f"{name}| {line.decode(errors='replace')}\n" for name, line in list(self.recent)
            )
        )


class _Sink:
    """Writes chunks to one of our file descriptors from a thread of its own."""

    def __init__(self, fd: int, *, json_lines: bool = False) -> None:
        self.fd = fd
        self._json = json_lines
        self._writer = WriterThread(f"trio-dpsup-log-{fd}", self._write, queue=_SINK_QUEUE)
        self.send = self._writer.send
        self.start = self._writer.start
        #: Bytes dropped by failed writes since the last that passed, and the last reason.
        self._dropped = 0
        self._why = ""

    def _write(self, chunk: bytes) -> None:
        left, error = write_whole(self.fd, chunk)
        if error is not None:
            # Nobody reads (EPIPE), or the disk is full (ENOSPC): drop this chunk, keep
            # draining the ranks' pipes so that they never block, and try the next one.
            self._dropped += left
            self._why = error.strerror or str(error)
        elif self._dropped:
            text = f"{self._dropped} bytes of rank output dropped: {self._why}"
            self._dropped = 0
            if self._json:
                entry = {
                    "time": iso_time(time.time()),
                    "level": "WARNING",
                    "logger": __name__,
                    "message": text,
                }
                self._write(json.dumps(entry).encode() + b"\n")
            else:
                self._write(f"[trio-dpsup] {text}\n".encode())

    async def close(self) -> None:
        """Write what is queued, then stop the thread.

        **Cancellation**: shielded, and bounded by DRAIN_TIMEOUT: output nobody reads any
        more (a stopped terminal) is abandoned to the daemon thread rather than waited for.
        """
        await self._writer.close(DRAIN_TIMEOUT)


class LogPump:
    """Pumps the output of every rank; made by `open_log_pump`."""

    def __init__(
        self,
        nursery: trio.Nursery,
        stdout: _Sink,
        stderr: _Sink,
        *,
        json_lines: bool = False,
        files: RankFiles | None = None,
    ) -> None:
        self._nursery = nursery
        self._sinks = {"stdout": stdout, "stderr": stderr}
        self._json = json_lines
        self._files = files

    def attach(self, rank: int, stdout: int, stderr: int, output: RankOutput) -> None:
        """Pump the read ends `stdout` and `stderr` (raw fds, now owned here) of rank `rank`."""
        output.pipes = pipes = _Pipes()  # a new process of the rank
        for name, fd in (("stdout", stdout), ("stderr", stderr)):
            sink = self._sinks[name]
            pipes.opened()
            if self._json:
                render = _json_line(rank, name)
            else:
                render = _text_line(_prefix(rank, sink.fd), terminal=os.isatty(sink.fd))
            to_file = None
            if self._files is not None:
                # The file is the rank's own: its lines as written, no prefix (JSON as above).
                as_written = render if self._json else _text_line(b"")
                to_file = _FileTee(self._files, rank, as_written)
            self._nursery.start_soon(_pump, fd, render, sink, name, output, pipes, to_file)


class _FileTee:
    """Where one pipe's lines go besides our stdout or stderr: its rank's file."""

    def __init__(self, files: RankFiles, rank: int, render: Callable[[bytes], bytes]) -> None:
        self.files = files
        self.rank = rank
        self.render = render

    def send(self, lines: list[bytes], output: RankOutput) -> None:
        """Offer `lines` to the file; never waits (see the module doc)."""
        if not self.files.offer(self.rank, b"".join(map(self.render, lines))):
            output.file_dropped_lines += len(lines)


@asynccontextmanager
async def open_log_pump(
    stdout_fd: int = 1,
    stderr_fd: int = 2,
    *,
    json_lines: bool = False,
    files: RankFiles | None = None,
) -> AsyncIterator[LogPump]:
    """Run the pumps for the duration of the block; on exit, wait for every attached pipe to
    reach EOF (callers bound that: see `wait_drained`), then flush our output (and close
    the ranks' files, with `files`, which this starts and closes).

    **Cancellation**: the exit is shielded; the pumps stop at once and what they had read is
    written out.
    """
    token = trio.lowlevel.current_trio_token()
    sinks = _Sink(stdout_fd, json_lines=json_lines), _Sink(stderr_fd, json_lines=json_lines)
    for sink in sinks:
        sink.start(token)
    if files is not None:
        files.start(token)
    try:
        async with trio.open_nursery() as nursery:
            yield LogPump(nursery, *sinks, json_lines=json_lines, files=files)
            # Every rank has drained or been abandoned by now (see run_rank): stop the rest.
            nursery.cancel_scope.cancel()
    finally:
        for sink in sinks:
            await sink.close()
        if files is not None:
            await files.close()


async def wait_drained(output: RankOutput) -> None:
    """Wait for a stopped rank's pipes to reach EOF, at most DRAIN_TIMEOUT.

    **Cancellation**: shielded; bounded.
    """
    with trio.CancelScope(shield=True), trio.move_on_after(DRAIN_TIMEOUT):
        await output.pipes.drained.wait()


async def _pump(
    fd: int,
    render: Callable[[bytes], bytes],
    sink: _Sink,
    name: str,
    output: RankOutput,
    pipes: _Pipes,
    to_file: _FileTee | None = None,
) -> None:
    """Read `fd` to EOF, sending each line to `sink` as `render` writes it (and to the
    rank's file, as `to_file` renders it).

    **Cancellation**: sends what it holds (a partial line gets its newline), then returns.
    """

    async def send(lines: list[bytes]) -> None:
        await sink.send.send(b"".join(map(render, lines)))
        if to_file is not None:
            to_file.send(lines, output)

    tail = output.stderr_tail if name == "stderr" else None
    recent = output.recent
    stream = trio.lowlevel.FdStream(fd)
    partial = bytearray()  # the line being read; never more than MAX_LINE bytes
    try:
        async with stream:
            while chunk := await stream.receive_some(_READ_SIZE):
                lines = _split(partial, chunk)
                if lines:
                    output.lines += len(lines)
                    await send(lines)
                    recent.extend((name, line[:RECENT_LINE_BYTES]) for line in lines)
                    if tail is not None:
                        tail.extend(_tail_line(line) for line in lines)
    finally:
        # Bounded: a reader of our output that stopped reading must not hang shutdown.
        with trio.CancelScope(shield=True), trio.move_on_after(DRAIN_TIMEOUT):
            if partial:
                await send([bytes(partial)])
                recent.append((name, bytes(partial[:RECENT_LINE_BYTES])))
                if tail is not None:
                    tail.append(_tail_line(bytes(partial)))
            pipes.closed()


def _split(partial: bytearray, chunk: bytes) -> list[bytes]:
    """The lines that `chunk` completes, after what `partial` holds; `partial` keeps the
    rest. Lines and the rest are cut at MAX_LINE bytes. `partial` never holds more than
    MAX_LINE bytes, so the joining costs at most that much per chunk: linear overall."""
    data = bytes(partial) + chunk if partial else chunk
    *lines, rest = data.split(b"\n")
    if len(data) > MAX_LINE and any(len(line) > MAX_LINE for line in lines):
        lines = [piece for line in lines for piece in _pieces(line)]
    while len(rest) >= MAX_LINE:
        lines.append(rest[:MAX_LINE])
        rest = rest[MAX_LINE:]
    partial[:] = rest
    return lines


def _pieces(line: bytes) -> list[bytes]:
    if len(line) <= MAX_LINE:
        return [line]
    return [line[i : i + MAX_LINE] for i in range(0, len(line), MAX_LINE)]


def _tail_line(line: bytes) -> str:
    text = line[: TAIL_LINE_CHARS * 4].decode(errors="replace")
    if len(text) <= TAIL_LINE_CHARS:
        return text
    return f"{text[:TAIL_LINE_CHARS]}… ({len(line)} bytes)"


def _text_line(prefix: bytes, *, terminal: bool = False) -> Callable[[bytes], bytes]:
    """``[rank 3] line``: the line as the rank wrote it, bytes untouched; on a `terminal`,
    with its control characters escaped (see the module doc)."""
    if terminal:
        return lambda line: prefix + escape_controls(line) + b"\n"
    return lambda line: prefix + line + b"\n"


#: C0 controls but tab, DEL, and C1 controls as UTF-8 encodes them (U+0080-U+009F).
_CONTROLS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|\xc2[\x80-\x9f]")
#: Characters that reorder what a terminal shows (bidi embeddings, overrides, isolates):
#: U+202E makes `exe.txt` of `txt.exe`.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def escape_controls(line: bytes) -> bytes:
    """`line` with every control character but tab written as ``\\xNN`` (each byte of
    one that UTF-8 encodes), and so every byte that is not UTF-8 (a raw 0x9b is CSI to a
    terminal in 8-bit mode) and every bidi control character."""
    if line.isascii():
        if not _CONTROLS.search(line):
            return line
        return _CONTROLS.sub(lambda m: b"".join(b"\\x%02x" % c for c in m[0]), line)
    out: list[str] = []
    for char in line.decode("utf-8", "surrogateescape"):
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as surrogateescape keeps it
            out.append(f"\\x{code - 0xDC00:02x}")
        elif (code < 0x20 and char != "\t") or 0x7F <= code <= 0x9F or char in _BIDI:
            out.append("".join(f"\\x{b:02x}" for b in char.encode()))
        else:
            out.append(char)
    return "".join(out).encode()


def _json_line(rank: int, stream: str) -> Callable[[bytes], bytes]:
    """One JSON object per line: time, rank, stream, message. Bytes that are not UTF-8 are
    escaped (``\\xff``), not lost."""

    def render(line: bytes) -> bytes:
        message = line.decode("utf-8", "backslashreplace")
        entry = {"time": iso_time(time.time()), "rank": rank, "stream": stream, "message": message}
        return json.dumps(entry, ensure_ascii=False).encode() + b"\n"

    return render


def _prefix(rank: int, fd: int) -> bytes:
    """``[rank 3] ``, coloured where our output is a terminal and NO_COLOR is not set
    (no-color.org: any value but the empty string turns colour off)."""
    text = f"[rank {rank}]"
    if os.isatty(fd) and not os.environ.get("NO_COLOR"):
        text = f"\x1b[{_COLOURS[rank % len(_COLOURS)]}m{text}\x1b[0m"
    return (text + " ").encode()
