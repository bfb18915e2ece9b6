"""Output that nobody reads, cannot be written, or never ends a line: the supervisor keeps
serving, loses nothing it can keep, and says what it had to drop."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
from pathlib import Path

import httpx
import trio

# The log pump as a unit, on purpose: its write errors and bounds, injected where a run
# cannot reach them.
from trio_dpsup._output.pump import MAX_LINE, RankOutput, open_log_pump
from trio_dpsup.testing import CLI, free_port_range

from .conftest import cli_args


async def wait_for_datagram(sock: trio.socket.SocketType, line: str) -> None:
    with trio.fail_after(30):
        while line not in (await sock.recv(4096)).decode().splitlines():
            pass


async def pipe_full(fd: int) -> None:
    """Wait until the pipe whose read end is `fd` is as good as full (bounded): at least
    half its capacity, since writes that do not fit a page leave the rest of it empty."""
    size = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) // 2
    with trio.fail_after(30):
        while struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0] < size:  # noqa: ASYNC110
            await trio.sleep(0.05)  # a pipe filling up has no event to wait on


async def test_a_stderr_nobody_reads_blocks_neither_probes_nor_signals(tmp_path: Path) -> None:
    # Our stderr is a pipe that is never read, and the ranks flood it: once the pipe is
    # full, the supervisor's own records must not block its event loop.
    read_end, write_end = os.pipe()
    base, control = free_port_range(3), free_port_range(1)
    flood = ["--log-lines", "20000"]
    args = cli_args(2, base, rank_args=flood)
    args[args.index("--control-port") + 1] = str(control)
    notify = str(tmp_path / "notify")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(notify)
        process = await trio.lowlevel.open_process(
            [*CLI, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=write_end,
            env={**os.environ, "NOTIFY_SOCKET": notify},
        )
        os.close(write_end)
        try:
            await wait_for_datagram(sock, "READY=1")
            await pipe_full(read_end)
            async with httpx.AsyncClient(timeout=2) as client:
                for _ in range(8):
                    response = await client.get(f"http://127.0.0.1:{control}/ready")
                    assert response.status_code == 200
            # Our records about the shutdown go to the full pipe too.
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                await process.wait()
            assert process.returncode in (0, 1)  # 1: a rank blocked on its full pipe was killed
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            os.close(read_end)


async def test_a_late_reader_of_a_non_blocking_stdout_gets_every_line(tmp_path: Path) -> None:
    # Our stdout is a non-blocking pipe, read only once the ranks have filled it: writes
    # that would block wait for room instead of stopping the relay for good.
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    base = free_port_range(1)
    lines = 6000  # half of them on stdout, about 250 KB: several pipefuls
    events = tmp_path / "events"
    args = cli_args(1, base, rank_args=["--log-lines", str(lines), "--events-file", str(events)])
    process = await trio.lowlevel.open_process(
        [*CLI, *args],
        stdin=subprocess.DEVNULL,
        stdout=write_end,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    received = bytearray()
    try:
        stream = trio.lowlevel.FdStream(read_end)
        await pipe_full(read_end)  # late: the relay has met a full pipe
        expected = f"log line {lines - 2} of {lines}".encode()
        with trio.fail_after(60):
            while expected not in received:
                received += await stream.receive_some(65536)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
            while chunk := await stream.receive_some(65536):
                received += chunk
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    numbers = [
        int(line.split(b"log line ")[1].split()[0])
        for line in bytes(received).splitlines()
        if b"log line " in line
    ]
    assert numbers == list(range(0, lines, 2))


async def test_a_momentary_write_error_drops_a_chunk_and_then_relays_again() -> None:
    # Our stdout starts as /dev/full (every write: ENOSPC), then becomes a pipe: what comes
    # after is relayed, with a line saying how much was dropped and why.
    out = os.open("/dev/full", os.O_WRONLY)
    rank_read, rank_write = os.pipe()
    rank_err_read, rank_err_write = os.pipe()
    reader, writer = os.pipe()
    received = bytearray()
    try:
        async with open_log_pump(stdout_fd=out, stderr_fd=out) as pump:
            pump.attach(7, rank_read, rank_err_read, RankOutput())
            os.write(rank_write, b"lost to a full disk\n")
            with trio.fail_after(10):
                while not _dropped_something(pump):  # noqa: ASYNC110
                    await trio.sleep(0.01)  # nothing to wait on: the error is inside a thread
            os.dup2(writer, out)  # space again
            os.write(rank_write, b"after the disk had room\n")
            with trio.fail_after(10):  # the line, then the notice of what was dropped
                while b"after the disk" not in received or b"dropped" not in received:
                    received += await trio.to_thread.run_sync(os.read, reader, 65536)
            os.close(rank_write)
            os.close(rank_err_write)
    finally:
        for fd in (out, reader, writer):
            os.close(fd)
    text = bytes(received)
    assert b"[rank 7] after the disk had room\n" in text
    assert b"[trio-dpsup] " in text
    assert b"bytes of rank output dropped: No space left" in text
    assert b"lost to a full disk" not in text


def _dropped_something(pump: object) -> bool:
    sinks = pump._sinks  # type: ignore[attr-defined]
    return any(sink._dropped for sink in sinks.values())


async def test_a_line_without_end_is_relayed_in_bounded_pieces(tmp_path: Path) -> None:
    # 20 MB on stderr with no newline, then an exit: relayed whole, in pieces of MAX_LINE,
    # and the root-cause record keeps a bounded tail of it.
    size = 20 * 1024 * 1024
    script = tmp_path / "flood.py"
    script.write_text(
        f"import os, sys\nsys.stderr.buffer.write(b'x' * {size}); sys.stderr.flush()\nos._exit(3)\n"
    )
    base = free_port_range(1)
    args = cli_args(1, base, options=["--log-format", "json"])
    args = [*args[: args.index("--") + 1], sys.executable, str(script), "{port}"]
    process = await trio.lowlevel.open_process(
        [*CLI, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    received = bytearray()
    with trio.fail_after(60):
        async for chunk in process.stderr:
            received += chunk
        assert await process.wait() == 3
    # In JSON mode every line is an object: the rank's pieces, and our own records.
    records = [json.loads(line) for line in bytes(received).split(b"\n") if line]
    relayed = [r["message"] for r in records if r.get("stream") == "stderr"]
    assert all(r["rank"] == 0 for r in records if "stream" in r)
    assert sum(len(message) for message in relayed) == size
    assert max(len(message) for message in relayed) <= MAX_LINE
    cause = next(r for r in records if r["message"].startswith("stopped after a failure"))
    assert len(cause["message"]) < 20_000
