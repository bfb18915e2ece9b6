"""Rank output through the log pump, the root-cause report, and the JSON log format."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from trio_dpsup import SupervisorState, SupervisorStatus
from trio_dpsup.testing import (
    CLI,
    FAKE_RANK,
    CliResult,
    Harness,
    free_port_range,
    open_cli_supervisor,
    run_cli,
)

pytest_plugins = ["trio_dpsup.testing.plugin"]

LINES = 3000
#: A rank that floods both streams, writes bytes that are not UTF-8 and a last line with no
#: newline, then crashes: every byte of it must come out.
FLOOD = f"""
import os, sys
for i in range({LINES}):
    sys.stdout.write("out %d\\n" % i)  # no braces: they would be placeholders
    sys.stderr.write("err %d\\n" % i)
sys.stdout.flush()
sys.stderr.flush()
os.write(2, b"not utf-8: \\xff\\xfe\\n")
os.write(2, b"last words, no newline")
os._exit(3)
"""


async def run_one_rank(
    *args: str, base: int | None = None, prefix: Sequence[str] = ()
) -> CliResult:
    """One rank on `base` (a free port unless given), run by the CLI with `args` to its end
    (after `prefix`, a wrapper such as prlimit)."""
    base = free_port_range(1) if base is None else base
    argv = [
        "--ranks", "1", "--gpus-per-rank", "0", "--base-port", str(base), "--control-port", "0",
        *args,
    ]  # fmt: skip
    with trio.fail_after(60):
        return await run_cli(argv, prefix=prefix)


async def test_every_line_a_crashing_rank_wrote_comes_out_prefixed() -> None:
    result = await run_one_rank("--", sys.executable, "-c", FLOOD)
    assert result.returncode == 3
    out = result.stdout_bytes.splitlines()
    assert out == [f"[rank 0] out {i}".encode() for i in range(LINES)]
    err = [line for line in result.stderr_bytes.splitlines() if line.startswith(b"[rank 0] ")]
    assert err[:LINES] == [f"[rank 0] err {i}".encode() for i in range(LINES)]
    assert err[LINES:] == [b"[rank 0] not utf-8: \xff\xfe", b"[rank 0] last words, no newline"]
    # The root-cause report: one record, with the rank's last stderr lines.
    report = result.stderr.split("stopped after a failure: ", 1)[1]
    cause, heading, *lines = report.splitlines()
    assert cause == "rank 0 exited unexpectedly: exit status 3"
    assert heading == "    the last lines rank 0 wrote to stderr:"
    tail = [line.removeprefix("    | ") for line in lines]
    assert tail == [f"err {i}" for i in range(LINES - 18, LINES)] + [
        "not utf-8: \ufffd\ufffd",
        "last words, no newline",
    ]


async def test_no_log_prefix_passes_output_through() -> None:
    result = await run_one_rank("--no-log-prefix", "--", sys.executable, "-c", FLOOD)
    assert result.returncode == 3
    assert result.stdout_bytes.splitlines() == [f"out {i}".encode() for i in range(LINES)]
    assert b"last words, no newline" in result.stderr_bytes
    assert b"[rank 0]" not in result.stderr_bytes


async def test_json_log_format() -> None:
    result = await run_one_rank("--log-format", "json", "--", sys.executable, "-c", FLOOD)
    assert result.returncode == 3
    # Every line of both streams is one JSON object: ours and the rank's.
    records = [json.loads(line) for line in result.stderr_bytes.splitlines()]
    out = [json.loads(line) for line in result.stdout_bytes.splitlines()]
    assert [(r["rank"], r["stream"], r["message"]) for r in out] == [
        (0, "stdout", f"out {i}") for i in range(LINES)
    ]
    relayed = [r["message"] for r in records if r.get("stream") == "stderr"]
    assert relayed == [
        *(f"err {i}" for i in range(LINES)),
        "not utf-8: \\xff\\xfe",  # escaped, not lost
        "last words, no newline",
    ]
    records = [r for r in records if "level" in r]  # our own records
    assert {"time", "level", "logger", "message"} <= set(records[0])
    started = next(r for r in records if r["message"].startswith("rank 0 started"))
    assert started["rank"] == 0
    last = records[-1]
    assert (last["level"], last["rank"]) == ("ERROR", 0)
    assert last["message"].endswith("    | last words, no newline")


async def test_json_needs_the_ranks_output_relayed() -> None:
    result = await run_one_rank("--log-format", "json", "--no-log-prefix", "--", "true")
    assert result.returncode == 2
    assert b"--log-format json turns every rank line into JSON" in result.stderr_bytes


async def test_status_shows_the_root_cause_until_exit(dpsup: Harness) -> None:
    rank_args = ["--log-lines", "6", "--stop-delay", "0.5"]
    deployment = await dpsup.start(2, rank_args=rank_args)
    await deployment.crash_rank(1, 9)

    # While rank 0 takes half a second to stop, /status names the cause. The fake rank
    # writes its lines at start; the condition waits for the pump to have relayed them all.
    def three_lines(s: SupervisorStatus) -> bool:
        stopping = s.state is SupervisorState.STOPPING
        return stopping and s.root_cause is not None and len(s.root_cause.stderr_tail) == 3

    await deployment.wait_for_status(three_lines, "the root cause with 3 lines")
    document = await deployment.status_document()
    assert document["root_cause"] == {
        "rank": 1,
        "cause": "rank 1 exited unexpectedly: exit status 9",
        "stderr_tail": [f"fake rank {deployment.ports[1]}: log line {i} of 6" for i in (1, 3, 5)],
        "evidence": None,  # no --evidence-dir, and the rank had exited anyway
    }
    assert await deployment.wait_exit() == 9


async def test_startup_progress_is_logged_while_ranks_load() -> None:
    base = free_port_range(2)
    args = [
        "--ranks", "2", "--gpus-per-rank", "0", "--base-port", str(base), "--control-port", "0",
        "--progress-log-interval", "0.2",
        "--", *FAKE_RANK, "--port", "{port}", "--ready-after", "{rank}.5",
    ]  # fmt: skip
    async with open_cli_supervisor(args) as sup:
        with trio.fail_after(30):
            await sup.wait_for_line(r"0/2 ranks ready after \d+s; waiting for 0, 1")
            await sup.wait_for_line(r"1/2 ranks ready after \d+s; waiting for 1$")
            await sup.wait_ready()
        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 0


def render_terminal(raw: bytes) -> list[str]:
    """What a terminal shows after `raw`: carriage returns, erase-to-end-of-line and
    newlines applied, colours dropped."""
    text = re.sub(rb"\x1b\[[0-9;]*m", b"", raw).decode("utf-8", "replace")
    lines: list[str] = []
    current: list[str] = []
    column = 0
    for token in re.split(r"(\x1b\[K|\r|\n)", text):
        if token == "\n":
            lines.append("".join(current))
            current, column = [], 0
        elif token == "\r":
            column = 0
        elif token == "\x1b[K":
            del current[column:]
        else:
            for char in token:
                if column < len(current):
                    current[column] = char
                else:
                    current.append(char)
                column += 1
    return [*lines, "".join(current)]


async def test_a_terminal_shows_one_startup_line_updated_in_place() -> None:
    # stdout and stderr on one terminal, ranks logging on both while they start: the line
    # is redrawn below their lines and our records, never into them, and erased when ready.
    try:
        controller, terminal = pty.openpty()
    except OSError as exc:  # a container without /dev/pts
        pytest.skip(f"no pseudo-terminal here: {exc}")
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    base = free_port_range(2)
    argv = [
        *CLI, "--ranks", "2", "--gpus-per-rank", "0",
        "--base-port", str(base), "--control-port", "0",
        "--", *FAKE_RANK, "--port", "{port}", "--ready-after", "{rank}.5",
        "--log-lines", "20", "--log-rate", "10",
    ]  # fmt: skip
    env = {**os.environ, "TERM": "xterm"}
    raw = bytearray()

    async def read_until(pattern: bytes | None) -> None:
        """Until `pattern` has come; None: to the end (the supervisor has exited)."""
        while pattern is None or pattern not in raw:
            await trio.lowlevel.wait_readable(controller)
            try:
                raw.extend(os.read(controller, 65536))
            except OSError:  # EIO: every end of the terminal is closed
                return

    os.set_blocking(controller, False)
    try:
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env=env
        )
        os.close(terminal)
        try:
            with trio.fail_after(30):
                await read_until(b"all 2 ranks are ready")
                proc.send_signal(signal.SIGTERM)
                await read_until(None)
                assert await proc.wait() == 0
        finally:
            proc.kill()
    finally:
        os.close(controller)
    drawn = raw.count(b"ranks ready after")
    assert drawn >= 2, raw  # updated, not written once
    # Never an older count below a record that says a rank is ready.
    after = raw.index(b"rank 0 is ready")
    assert b"0/2 ranks ready after" not in raw[after:], raw[after:]
    assert b"0/2 ranks ready after" in raw
    assert b"1/2 ranks ready after" in raw
    assert b"\r\x1b[K" in raw
    shown = [line for line in render_terminal(bytes(raw)) if line.strip()]
    # Erased for good, and every line on the screen a whole record or rank line.
    assert not [line for line in shown if "ranks ready after" in line], shown
    rank_lines = [line for line in shown if line.startswith("[rank ")]
    assert len(rank_lines) >= 10, shown
    for line in shown:
        assert re.fullmatch(r"(\[rank \d\] fake rank \d+: log line \d+ of 20|20\d\d-.*)", line), (
            line
        )


async def test_log_dir_keeps_each_ranks_lines_in_rotated_files(tmp_path: Path) -> None:
    # 500 lines of 16 bytes on one stream (8000 bytes), files rotated at 2000 bytes, 2 kept:
    # each file is under the limit and ends with a whole line, the oldest lines are gone, and
    # the files hold the last ones in order, as the rank wrote them. Named by global rank.
    log_dir = tmp_path / "logs"
    # No braces in the script: they would be placeholders.
    lines = "import sys\nfor i in range(500): print('rank %s line %03d' % (sys.argv[1], i))"
    result = await run_one_rank(
        "--start-rank", "3", "--startup-timeout", "0",
        "--log-dir", str(log_dir), "--log-max-bytes", "2000", "--log-backups", "2",
        "--", sys.executable, "-c", lines, "{rank}",
    )  # fmt: skip
    assert result.returncode != 2, result.stderr
    output = result.stdout
    rank = 3
    names = sorted(p.name for p in log_dir.glob(f"rank-{rank}.log*"))
    assert names == [f"rank-{rank}.log", f"rank-{rank}.log.1", f"rank-{rank}.log.2"]
    files = [log_dir / f"rank-{rank}.log.{n}" for n in (2, 1)] + [log_dir / f"rank-{rank}.log"]
    texts = [file.read_text() for file in files]
    for text in texts:
        assert 0 < len(text) <= 2000, text
        assert text.endswith("\n"), text
    kept = "".join(texts).splitlines()
    assert 2 * 2000 // 16 < len(kept) < 500  # two full files and more; not everything
    assert kept == [f"rank {rank} line {i:03d}" for i in range(500 - len(kept), 500)]
    # Our own stdout still has every line, prefixed.
    assert f"[rank {rank}] rank {rank} line 000" in output
    assert f"[rank {rank}] rank {rank} line 499" in output


async def test_a_log_file_that_cannot_be_written_loses_no_line_elsewhere(tmp_path: Path) -> None:
    # The supervisor may write files of at most 64 bytes (RLIMIT_FSIZE): past that, every
    # write to rank-0.log fails (EFBIG), as on a full disk. One warning says so, and the
    # rank's lines are all on our stdout still. (A link to /dev/full is no longer followed:
    # see test_local_attacks.)
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    # Paced, so that the lines come in many chunks: many failed writes, one warning.
    lines = "import time\nfor i in range(50): print('line %d' % i, flush=True); time.sleep(0.01)"
    result = await run_one_rank(
        "--startup-timeout", "0", "--log-dir", str(tmp_path), "--", sys.executable, "-c", lines,
        prefix=["prlimit", "--fsize=64", "--"],
    )  # fmt: skip
    stderr = result.stderr
    assert result.returncode != 2, stderr
    assert stderr.count("lines not written to") == 1, stderr
    assert f"rank 0: lines not written to {tmp_path}/rank-0.log: File too large" in stderr
    assert result.stdout.splitlines() == [f"[rank 0] line {i}" for i in range(50)]
    assert (tmp_path / "rank-0.log").stat().st_size <= 64


async def test_log_dir_in_json_mode_holds_json_lines(tmp_path: Path) -> None:
    base = free_port_range(1)
    result = await run_one_rank(
        "--startup-timeout", "0", "--log-format", "json", "--log-dir", str(tmp_path),
        "--", *FAKE_RANK, "--port", "{port}", "--log-lines", "10", "--exit-after", "1",
        base=base,
    )  # fmt: skip
    assert result.returncode != 2, result.stderr
    entries = [json.loads(line) for line in (tmp_path / "rank-0.log").read_text().splitlines()]
    log_lines = [e for e in entries if "log line" in e["message"]]
    assert {e["rank"] for e in entries} == {0}
    for stream, first in (("stdout", 0), ("stderr", 1)):
        messages = [e["message"] for e in log_lines if e["stream"] == stream]
        assert messages == [f"fake rank {base}: log line {i} of 10" for i in range(first, 10, 2)]


def test_control_characters_from_ranks_are_escaped_on_a_terminal() -> None:
    # A unit test of the pump's escaping on purpose (private): a rank's ESC or CR must not
    # move the operator's cursor or rewrite earlier lines; tab and UTF-8 text stay.
    from trio_dpsup._output.pump import escape_controls  # the escaping unit, on purpose

    line = "title\x1b]0;pwned\x07 back\rover \x9b2J tab\tok é".encode()
    assert escape_controls(line) == (
        b"title\\x1b]0;pwned\\x07 back\\x0dover \\xc2\\x9b2J tab\tok " + "é".encode()
    )
    assert escape_controls(b"plain line") == b"plain line"
    # A raw 0x9b (CSI to a terminal in 8-bit mode) and U+202E (right-to-left override, which
    # shows `txt.exe` as `exe.txt`) slipped through on f2fe13b.
    assert escape_controls(b"raw \x9b[2J, rtl \xe2\x80\xae and \xc3\xa9") == (
        b"raw \\x9b[2J, rtl \\xe2\\x80\\xae and \xc3\xa9"
    )


def test_a_file_writer_that_falls_behind_drops_for_the_file_alone(tmp_path: Path) -> None:
    # A unit test on purpose (private): the writer thread is never started, as if blocked
    # on a hung disk for good. Offering lines never waits; once its queue is full they are
    # refused (the pump then counts them), and nothing else is slowed.
    # The rotation unit, on purpose: a byte-exact check a run cannot make.
    from trio_dpsup._output.log_files import LogFiles, RankFiles, open_log_dir

    directory = open_log_dir(str(tmp_path))
    files = RankFiles(LogFiles(str(tmp_path), 1000, 1), directory)
    taken = [files.offer(0, b"line\n") for _ in range(1000)]  # returns: it cannot wait
    os.close(directory)
    assert taken[0]
    assert not taken[-1]
    assert taken.index(False) == taken.count(True), "refused from the first full queue on"
