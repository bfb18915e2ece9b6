"""Starting rank processes so that they die with the supervisor, and awaiting their exit.

Why not `trio.lowlevel.open_process`: it forks from one of Trio's worker threads, and
PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. Trio's
idle worker threads exit after about 10 s, so a rank started that way would be killed 10 s
after start. Here every rank is forked from one dedicated thread that lives exactly as long as
the supervisor (`open_spawner`), so the death signal means what it should: the supervisor is
gone. The exit is awaited on a pidfd, as Trio itself does on Linux: no polling, no thread.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from .cgroup import enter_cgroup

__all__ = ["RankProcess", "Spawner", "open_spawner"]

# From <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

# Loaded before any fork: the child may only call into it, not load libraries.
_libc = ctypes.CDLL(None, use_errno=True)


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (PR_SET_CHILD_SUBREAPER).

    A rank's grandchild that double-forks then stays in our process tree instead of
    re-parenting to init. This is process-wide, so the CLI turns it on and the library leaves
    it to the embedding program. Returns False where the kernel refuses.
    """
    return bool(_libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def _die_with_parent(parent_pid: int, cgroup: str | None) -> None:
    """preexec_fn: SIGKILL this child when the forking thread dies (see the module doc), and
    move it into its rank's cgroup, before it runs anything of its own."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # If the parent died between fork and prctl, no death signal will ever come.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)
    if cgroup is not None:
        enter_cgroup(cgroup)


class RankProcess:
    """One started rank: its pid, and an awaitable exit. Only this object reaps it."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        output: tuple[int, int] | None = None,
        own: set[int] | None = None,
    ) -> None:
        self._popen = popen
        self._own = own
        #: The read ends of the rank's stdout and stderr pipes, when its output is captured.
        self.output = output
        # Opened while the child is unreaped, so the pid cannot have been reused.
        self._pidfd: int | None = os.pidfd_open(popen.pid)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """None while running; negative for death by a signal, as in subprocess."""
        return self._popen.returncode

    async def wait(self) -> int:
        """Wait for the process to exit, reap it, and return its returncode.

        **Cancellation**: safe; the process is left running and can be awaited again.
        """
        if self._popen.returncode is None:
            assert self._pidfd is not None
            await trio.lowlevel.wait_readable(self._pidfd)
            self._popen.wait()  # the pidfd is readable: it has exited, so this does not block
            self._close_pidfd()
            if self._own is not None:
                self._own.discard(self._popen.pid)  # reaped: the pid may name another now
        assert self._popen.returncode is not None
        return self._popen.returncode

    def signal_group(self, signum: int) -> bool:
        """Send `signum` to the rank's process group; False if the group is gone.

        Ranks lead their own session, so the group id is the rank's pid. Linux does not reuse
        a pid while a group of that id exists, so this never reaches a stranger.
        """
        try:
            os.killpg(self._popen.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


@dataclass(frozen=True)
class _Job:
    argv: Sequence[str]
    env: Mapping[str, str]
    #: The write ends for the child's stdout and stderr; None: inherit ours.
    output: tuple[int, int] | None
    cgroup: str | None
    own: set[int]
    deliver: Callable[[subprocess.Popen[bytes] | BaseException], None]


class Spawner:
    """Forks rank processes from the one thread that `open_spawner` keeps alive."""

    def __init__(self, jobs: queue.SimpleQueue[_Job | None], lock: threading.Lock) -> None:
        self._jobs = jobs
        #: Held while a process is being started, and `own` gets its pid before the lock
        #: is let go: a reaper of adopted orphans holds it while it reads `own`, so a rank
        #: that exits at once is never taken for an orphan and reaped behind its owner.
        self.lock = lock
        #: The pids of the processes started here and not reaped yet.
        self.own: set[int] = set()

    async def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        capture: bool = False,
        cgroup: str | None = None,
    ) -> RankProcess:
        """Start `argv` in a new session with `env`, stdin from /dev/null, and stdout and
        stderr inherited, or with `capture` each a pipe (`RankProcess.output`); with
        `cgroup`, inside that cgroup from its first instruction.

        Raises OSError if the program cannot be executed.

        **Cancellation**: shielded. A fork takes milliseconds, and a caller cancelled halfway
        would otherwise leave a process that nobody owns.
        """
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[subprocess.Popen[bytes] | BaseException] = []

        def deliver(value: subprocess.Popen[bytes] | BaseException) -> None:
            result.append(value)
            token.run_sync_soon(done.set)

        pipes = (os.pipe(), os.pipe()) if capture else None
        write_ends = None if pipes is None else (pipes[0][1], pipes[1][1])
        self._jobs.put(_Job(argv, env, write_ends, cgroup, self.own, deliver))
        with trio.CancelScope(shield=True):
            await done.wait()
        if pipes is not None:
            for _, write_end in pipes:
                os.close(write_end)  # the child has its copy: EOF comes when its tree is gone
        if isinstance(result[0], BaseException):
            if pipes is not None:
                for read_end, _ in pipes:
                    os.close(read_end)
            raise result[0]
        read_ends = None if pipes is None else (pipes[0][0], pipes[1][0])
        return RankProcess(result[0], read_ends, self.own)


def _spawner_thread(jobs: queue.SimpleQueue[_Job | None], lock: threading.Lock) -> None:
    parent_pid = os.getpid()
    while (job := jobs.get()) is not None:
        try:
            with lock:
                popen = _popen(job, parent_pid)
                job.own.add(popen.pid)
        except BaseException as exc:
            job.deliver(exc)
        else:
            job.deliver(popen)


def _popen(job: _Job, parent_pid: int) -> subprocess.Popen[bytes]:
    cgroup = job.cgroup
    return subprocess.Popen(
        list(job.argv),
        env=dict(job.env),
        stdin=subprocess.DEVNULL,
        stdout=None if job.output is None else job.output[0],
        stderr=None if job.output is None else job.output[1],
        start_new_session=True,  # its own process group, signalled as a whole
        preexec_fn=lambda: _die_with_parent(parent_pid, cgroup),
    )


@asynccontextmanager
async def open_spawner() -> AsyncIterator[Spawner]:
    """Keep a spawner thread alive for the duration of the block.

    Every process it started must be gone before the block exits: when the thread ends, their
    death signal fires.

    **Cancellation**: the block's exit is shielded while the thread finishes its last fork,
    which takes milliseconds.
    """
    jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
    lock = threading.Lock()
    thread = threading.Thread(
        target=_spawner_thread, args=(jobs, lock), name="trio-dpsup-spawner", daemon=True
    )
    thread.start()
    try:
        yield Spawner(jobs, lock)
    finally:
        jobs.put(None)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.join)
