"""Evidence before a kill: what a hung rank was doing, captured before its SIGTERM.

When a rank is failed while its processes are still alive (failed probes, a stall, the
startup deadline, a GPU fault), its own stop waits for the capture, bounded by
``evidence_timeout``; /ready already answers 503 and every other rank is already being
stopped. One folder per failure, ``<evidence_dir>/<run id>/<UTC time>-rank<r>/``:

* ``cause.txt``: the failure;
* ``stacks.txt``: ``py-spy dump`` of every Python process of the rank's tree (the optional
  extra ``debug``), and the native thread stacks of every other one (an engine in C++, such
  as llama.cpp's llama-server): ``eu-stack`` (elfutils) where installed, else ``gdb -batch``;
  where no tool is there or may not attach, it says so instead;
* ``log.txt``: the rank's last lines of stdout and stderr (RECENT_LINES);
* ``status.json``: the rank's /status entry, with its GPUs' last readings;
* ``xid.json``, with NVML: the Xid events reported on its GPUs during the run.

The folder's path goes into the rank's /status entry and the root-cause record. At most
``evidence_keep`` folders are kept, of every run in the directory: the oldest go first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from .._config.concerns import EvidenceSettings
from .._errors import (
    GenerationFailed,
    GpuFailed,
    RankStalled,
    RankStartTimeout,
    RankUnhealthy,
    StartupStalled,
    StartupTimeout,
    SupervisorFailure,
)
from .._gpu.nvml import XidSeen
from .._output.private_dir import open_subdir
from .._output.redact import redact_text
from .._proc.cookie import TREE_ENV, rank_cookie
from .._state.board import RankRecord
from .._state.document import rank_to_json

__all__ = ["EVIDENCE_DIR_MODE", "EvidenceRequest", "capture_evidence", "wants_evidence"]

logger = logging.getLogger(__name__)

#: Failures whose rank may still be running, and whose stacks say why.
_KINDS = (
    RankUnhealthy,
    RankStalled,
    GenerationFailed,
    RankStartTimeout,
    StartupStalled,
    StartupTimeout,
    GpuFailed,
)
#: The folders of the evidence: only our user may read what ranks printed.
EVIDENCE_DIR_MODE = 0o700
_NO_PY_SPY = (
    "py-spy is not installed, so no stacks were taken: pip install 'trio-dpsup[debug]' "
    "(and, in a container, allow ptrace: CAP_SYS_PTRACE)\n"
)


@dataclass(frozen=True)
class EvidenceRequest:
    """What one failure's evidence is made of, gathered by the rank's task before the kill."""

    run_id: str
    record: RankRecord
    failure: SupervisorFailure
    #: The rank's process tree, now.
    pids: frozenset[int]
    #: The critical Xid errors seen in this run (those on the rank's devices are kept).
    xids: tuple[XidSeen, ...] = ()


def wants_evidence(config: EvidenceSettings, failure: SupervisorFailure | None) -> bool:
    return config.evidence_dir is not None and isinstance(failure, _KINDS)


async def capture_evidence(
    config: EvidenceSettings, request: EvidenceRequest, directory: int
) -> str | None:
    """Write the evidence of `request`'s failure of its rank under `directory`, the checked
    --evidence-dir's descriptor; return the folder, or None if it could not be written
    (logged).

    **Cancellation**: the caller shields it; the stacks are bounded by evidence_timeout
    (what they had not given by then is noted as cut, and the tree is continued in case a
    debugger cut off mid-attach left it stopped), the rest is quick.
    """
    assert config.evidence_dir is not None
    record, failure = request.record, request.failure
    rank = record.plan.rank
    stamp = (
        time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
    )
    name = f"{stamp}-rank{rank}"
    folder = Path(config.evidence_dir) / request.run_id / name
    start = trio.current_time()
    files = {
        "cause.txt": f"{failure}\n",
        "log.txt": record.output.recent_text() or _NO_LOG,
        "status.json": json.dumps(rank_to_json(record.snapshot()), indent=2) + "\n",
    }
    if record.plan.gpus:
        own = {uuid for g in record.plan.gpus for uuid in (g.uuid, g.parent_uuid) if uuid}
        events = [
            {"time": seen.at, "gpu": seen.event.uuid, "xid": seen.event.xid}
            for seen in request.xids
            if seen.event.uuid in own
        ]
        files["xid.json"] = json.dumps(events, indent=2) + "\n"
    try:
        folder_fd = await trio.to_thread.run_sync(_make_folder, directory, request.run_id, name)
    except OSError as exc:
        logger.error("rank %d: cannot write its evidence in %s: %s", rank, folder, exc)
        return None
    try:
        secret = config.secret_options
        await trio.to_thread.run_sync(_write, folder_fd, files, secret)
        # The debuggers carry the rank's cookie: members of its tree, so that the guardian
        # kills one that hangs if the supervisor itself is killed meanwhile.
        env = {**os.environ, TREE_ENV: rank_cookie(request.run_id, rank)}
        stacks, cut = await _stacks(sorted(request.pids), config.evidence_timeout, env)
        if cut:
            _continue(request.pids)
        await trio.to_thread.run_sync(_write, folder_fd, {"stacks.txt": stacks}, secret)
    except OSError as exc:
        logger.error("rank %d: cannot write its evidence in %s: %s", rank, folder, exc)
        return None
    finally:
        os.close(folder_fd)
    if config.evidence_keep:
        await trio.to_thread.run_sync(_prune, directory, config.evidence_keep)
    logger.warning(
        "rank %d: evidence of the failure in %s (%.2fs)",
        rank,
        folder,
        trio.current_time() - start,
        extra={"rank": rank},
    )
    return str(folder)


def _make_folder(directory: int, run_id: str, name: str) -> int:
    """Make ``<run id>/<name>`` (0700) under the evidence directory's descriptor and open
    it, never by path and never through a link: a run's folder already there is kept only
    if it is ours and private, and the failure's own folder must be new."""
    run_fd = open_subdir(directory, run_id, EVIDENCE_DIR_MODE, exist_ok=True)
    try:
        return open_subdir(run_fd, name, EVIDENCE_DIR_MODE, exist_ok=False)
    finally:
        os.close(run_fd)


#: A failure's folder: its UTC time, then its rank (see `capture_evidence`).
_FOLDER = re.compile(r"\d{8}T\d{6}\.\d{3}Z-rank\d+")


def _prune(directory: int, keep: int) -> None:
    """Remove the oldest failure folders of every run in the evidence directory (its
    descriptor) until `keep` are left, and the run folders they leave empty. Only names of
    our own shape are touched, each through its parent's descriptor and never through a
    link (shutil.rmtree with dir_fd). Errors are logged, never raised: a full or odd
    directory must not stop a rank's stop."""
    try:
        folders: list[tuple[str, str]] = []  # (folder, run)
        with os.scandir(directory) as runs:
            for run in runs:
                if not run.is_dir(follow_symlinks=False):
                    continue
                run_fd = os.open(
                    run.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory
                )
                try:
                    with os.scandir(run_fd) as entries:
                        folders += [
                            (entry.name, run.name)
                            for entry in entries
                            if _FOLDER.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
                        ]
                finally:
                    os.close(run_fd)
        folders.sort()  # the UTC time first: oldest first, whatever the run
        emptied: set[str] = set()
        for name, run_name in folders[: max(0, len(folders) - keep)]:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
            run_fd = os.open(run_name, flags, dir_fd=directory)
            try:
                shutil.rmtree(name, dir_fd=run_fd)
                emptied.add(run_name)
            finally:
                os.close(run_fd)
        for run_name in emptied:
            with contextlib.suppress(OSError):  # not empty: it still holds newer ones
                os.rmdir(run_name, dir_fd=directory)
    except OSError as exc:
        logger.warning("cannot remove old evidence (--evidence-keep): %s", exc)


def _write(folder: int, files: dict[str, str], secret_options: tuple[str, ...]) -> None:
    """Write `files` in the open `folder`, each 0600 and with secrets redacted (the
    --secret-option names too): evidence holds what the rank printed and the command lines
    py-spy shows. A file or link already
    at a name is refused (O_EXCL, O_NOFOLLOW), never written through."""
    for name, text in files.items():
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=folder)
        with open(fd, "w", encoding="utf-8", errors="replace") as f:
            f.write(redact_text(text, secret_options))


async def _kill(process: trio.Process) -> None:
    """Cut off a dump at once: a debugger that hangs may ignore SIGTERM (trio's default
    cancellation waits 5 s more for it), and the kernel detaches a killed tracer's tracees."""
    process.kill()


def _continue(pids: frozenset[int]) -> None:
    """SIGCONT each pid: a debugger killed mid-attach can leave its process stopped, and a
    rank we fail must be left as it was, running, for its own stop."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)


_NO_LOG = "no lines: the rank's output is not relayed (--no-log-prefix), or it wrote none\n"


def _py_spy() -> str | None:
    """py-spy beside our interpreter (a virtualenv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def _native_stacks(pid: int) -> list[str] | None:
    """The command that prints every thread's native stack of `pid`, or None without a tool:
    eu-stack (elfutils: fast, no debugger started), else gdb in batch mode."""
    eu_stack = shutil.which("eu-stack")
    if eu_stack is not None:
        return [eu_stack, "-p", str(pid)]
    gdb = shutil.which("gdb")
    if gdb is not None:
        return [gdb, "-batch", "-nx", "-p", str(pid), "-ex", "thread apply all bt"]
    return None


def _is_python(pid: int) -> bool:
    try:
        return "python" in os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return True  # gone, or not ours to read: py-spy will say which


_NO_NATIVE = (
    "not a Python process, and neither eu-stack (elfutils) nor gdb is installed for its "
    "native stacks: apt install elfutils\n"
)


async def _stacks(
    pids: list[int],
    timeout: float,  # noqa: ASYNC109
    env: dict[str, str],
) -> tuple[str, bool]:
    """The stacks of each pid (py-spy for Python, eu-stack or gdb for the others), all at
    once, within `timeout` seconds in all; and whether a dump was cut off."""
    program = _py_spy()
    dumps: dict[int, str] = {}

    def command(pid: int) -> list[str] | str:
        if not _is_python(pid):
            return _native_stacks(pid) or _NO_NATIVE
        if program is None:
            return _NO_PY_SPY
        return [program, "dump", "--pid", str(pid)]

    async def dump(pid: int) -> None:
        argv = command(pid)
        if isinstance(argv, str):
            dumps[pid] = argv
            return
        try:
            result = await trio.run_process(
                argv,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                stdin=subprocess.DEVNULL,
                env=env,
                deliver_cancel=_kill,
            )
        except OSError as exc:
            dumps[pid] = f"{os.path.basename(argv[0])} could not run: {exc}\n"
            return
        out = result.stdout.decode(errors="replace")
        if result.returncode != 0:
            err = result.stderr.decode(errors="replace").strip()
            # Gone, or not ours to trace (ptrace not permitted).
            out += f"{os.path.basename(argv[0])} exited {result.returncode}: {err}\n"
        dumps[pid] = out

    with trio.move_on_after(timeout) as bound:
        async with trio.open_nursery() as nursery:
            for pid in pids:
                nursery.start_soon(dump, pid)
    parts = []
    for pid in pids:
        text = dumps.get(pid, f"cut: no dump within --evidence-timeout {timeout:g}s\n")
        parts.append(f"==== pid {pid} ====\n{text}")
    return "\n".join(parts), bound.cancelled_caught
