"""Who belongs to a run's rank trees: one answer for the stop procedure, the guardian, the
placement check and the leftover report.

Each rank leads a session and a process group of its own and carries the run's tree cookie
in its environment. A process belongs to rank r's tree when any of these holds:

1. its session or process group is rank r's (it was started in the rank's session and never
   called setsid): this survives ``setproctitle``, which overwrites what /proc shows of the
   environment, and ``env -i``, which drops it;
2. it carries rank r's cookie (``TRIO_DPSUP_TREE=<run>:<r>``): this survives setsid, a
   double fork and re-parenting to init;
3. it was seen as a member before, by pid and start time: the supervisor's tree watch walks
   the trees every few seconds and streams what it sees to the guardian (the registry), so
   a member that later leaves the session *and* loses its cookie is still known;
4. its parent is a member (while parent links hold);
5. where this process is a child subreaper (the CLI), any child of ours that we did not start
   is an orphan adopted from one of the trees: a member, of its cookie's rank or of no rank
   in particular (`ADOPTED`).

What none of these catches: a process that left the rank's session and lost its cookie
before the watch ever saw it, and (in the library, where no subreaper adopts it) whose
parent exited. A cgroup per rank (`--cgroups`, see cgroup.py) catches that too.

Standard library only: the guardian process imports this module. Everything here reads
/proc and blocks: the supervisor calls it in a worker thread, except `Trees.walk`, whose
cost is the size of the trees, not of the machine.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .cookie import member_of

__all__ = ["ADOPTED", "ProcStat", "Root", "Trees", "children_of", "read_stat"]

#: The rank of a member adopted by a subreaper whose rank cannot be told (no cookie left).
ADOPTED = -1
#: Bounds on walks up parent links and down children links: a loop can never hang us.
_MAX_DEPTH = 64
#: Kill passes: a process forked while one pass runs is caught by the next.
MAX_KILL_PASSES = 20
#: How long the kill passes wait for the processes they killed to have exited, and for
#: how many at most (one pidfd each: a process that forks in a loop must not use up the
#: open files the passes need to kill it).
EXIT_TIMEOUT = 5.0
MAX_DYING = 256
#: Members the walk keeps two descriptors open for (see Trees.walk); more are read by
#: path. 64 covers 8 ranks of 8 processes in 128 descriptors, within what the plan
#: budgets for ranks (see _config.plan.FDS_PER_RANK).
MAX_WATCHED = 64


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of /proc/PID/stat that membership needs. `start` is in clock ticks since
    boot: with the pid, it names one process for good (a reused pid has a later start)."""

    pid: int
    ppid: int
    pgrp: int
    sid: int
    start: int
    zombie: bool


def _read(path: str, *, whole: bool = False) -> bytes | None:
    """A /proc file's bytes, or None if it cannot be read: one read of at most 4 KiB, or
    with `whole` every read to the end (`_pread` on a descriptor opened for it).

    os.open and os.read, not open(): the tree watch reads a few of these per rank every
    second, and a buffered file object costs half as much again (measured: 11.5 against
    7.2 µs a read, on 2 cores).
    """
    fd = _open(path)
    if fd is None:
        return None
    try:
        return _pread(fd, whole=whole)
    finally:
        os.close(fd)


def _open(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _pread(fd: int, *, whole: bool = False) -> bytes | None:
    """A /proc file's bytes from its start through `fd` (one read of at most 4 KiB, or
    with `whole` every read to the end); None if it cannot be read, as once the process
    of a kept descriptor is gone (ESRCH: it names the process, not its pid)."""
    try:
        data = os.pread(fd, 4096, 0)
        if whole and data:
            while chunk := os.pread(fd, 65536, len(data)):
                data += chunk
        return data
    except OSError:
        return None


def _pids(data: bytes) -> list[int]:
    return [int(pid) for pid in data.split()]


def read_stat(pid: int) -> ProcStat | None:
    """/proc/PID/stat, or None if the process is gone (or in no namespace of ours)."""
    return _parse_stat(pid, _read(f"/proc/{pid}/stat"))  # under 1 KiB: one read holds it


def _parse_stat(pid: int, data: bytes | None) -> ProcStat | None:
    if data is None:
        return None
    # The command name sits in parentheses and may itself hold ')' or spaces.
    fields = data.rpartition(b")")[2].split()
    try:
        return ProcStat(
            pid=pid,
            ppid=int(fields[1]),
            pgrp=int(fields[2]),
            sid=int(fields[3]),
            start=int(fields[19]),
            zombie=fields[0] in (b"Z", b"X"),
        )
    except (IndexError, ValueError):
        return None


def children_of(pid: int, *, every_thread: bool = True) -> list[int]:
    """The children of `pid`, from /proc/PID/task/*/children (no scan of the table).

    Each thread has its own children file, and a process's children are those its threads
    forked. With `every_thread` False only the main thread's is read: one read, however
    many threads the process has (see Trees.walk).
    """
    if not every_thread:
        data = _read(f"/proc/{pid}/task/{pid}/children", whole=True)
        return [int(child) for child in data.split()] if data else []
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        data = _read(f"/proc/{pid}/task/{tid}/children", whole=True)
        if data:
            found.extend(int(child) for child in data.split())
    return found


@dataclass(frozen=True, slots=True)
class Root:
    """A rank's own process: it leads the rank's session and process group."""

    rank: int
    pid: int
    start: int


#: pid and start time: one process, for good.
Key = tuple[int, int]


@dataclass(frozen=True, slots=True)
class _Kept:
    """A member's /proc files, kept open by the walk (see Trees.walk): its stat, which
    cannot be read once the process is gone (the descriptor names the process, not its
    pid: a reused pid does not read as the member), and its main thread's children."""

    start: int
    stat: int
    children: int

    @classmethod
    def open(cls, pid: int) -> tuple[ProcStat, _Kept] | None:
        """Open both, and read the stat through its descriptor; None if `pid` is gone."""
        stat_fd = _open(f"/proc/{pid}/stat")
        if stat_fd is None:
            return None
        children = _open(f"/proc/{pid}/task/{pid}/children")
        stat = _parse_stat(pid, _pread(stat_fd)) if children is not None else None
        if stat is None or children is None:
            os.close(stat_fd)
            if children is not None:
                os.close(children)
            return None
        return stat, cls(stat.start, stat_fd, children)

    def close(self) -> None:
        os.close(self.stat)
        os.close(self.children)


class Trees:
    """What is known of one run's rank trees, and the scans that find their members.

    `adopter` is this process's pid where it is a child subreaper (its orphans are the
    trees'); `exclude` are pids that are never members (the guardian). The supervisor
    mutates this object from its event loop only; scans copy what they read first, so
    they can run in a worker thread meanwhile.
    """

    def __init__(
        self, run_id: str, *, adopter: int | None = None, exclude: Iterable[int] = ()
    ) -> None:
        self.run_id = run_id
        self.adopter = adopter
        self.exclude = set(exclude)
        #: Every rank process started in this run, restarts included.
        self.roots: list[Root] = []
        #: Members seen before: (pid, start) -> rank.
        self.seen: dict[Key, int] = {}
        #: Set when ranks have cgroups of their own (see cgroup.py): how /proc/PID/cgroup
        #: names them, up to the rank number.
        self.cgroup_marker: bytes | None = None
        # Processes whose environment had no cookie of ours: none can gain one later.
        self._no_cookie: set[Key] = set()
        # Members the walk reached, by pid, with their /proc files kept open (see walk).
        # The event loop's alone: no scan reads them.
        self._watched: dict[int, _Kept] = {}

    # -- what is known --------------------------------------------------------------------

    def add_root(self, rank: int, pid: int, start: int | None = None) -> Root | None:
        """Record rank `rank`'s new process; None if it is already gone."""
        if start is None:
            stat = read_stat(pid)
            if stat is None:
                return None
            start = stat.start
        root = Root(rank, pid, start)
        self.roots.append(root)
        self.seen[(pid, start)] = rank
        return root

    def remember(self, pid: int, start: int, rank: int) -> bool:
        """Record a member; True if it was not known before."""
        key = (pid, start)
        if self.seen.get(key) == rank:
            return False
        self.seen[key] = rank
        return True

    def forget_dead(self) -> None:
        """Drop what names processes that are gone (bounds the registry and the cookie
        cache over a long run)."""
        for key in [k for k in self.seen if not _same(k)]:
            del self.seen[key]
        self._no_cookie = {k for k in self._no_cookie if _same(k)}

    def prune(self) -> None:
        """Forget what names only the dead: members that are gone (`forget_dead`), and rank
        processes that are gone with no member of theirs left alive (one known, or one
        started in their time with their session). Without it every restart would add a
        record that each round reads again: 1,632 restarts raised the idle CPU tenfold,
        and a pid named long ago may name someone else's process today."""
        self.forget_dead()
        alive = list(self.seen.items())
        kept: list[Root] = []
        for index, root in enumerate(self.roots):
            if _same((root.pid, root.start)):
                kept.append(root)
                continue
            # Its members were started after it and before its rank's next process (a
            # restart waits until the old tree is stopped).
            later = next((r.start for r in self.roots[index + 1 :] if r.rank == root.rank), None)
            if any(
                rank == root.rank and root.start <= start and (later is None or start < later)
                for (_, start), rank in alive
            ):
                kept.append(root)
        self.roots = kept

    # -- finding members ------------------------------------------------------------------

    def cookie_rank(self, pid: int) -> int | None:
        """The rank named by `pid`'s cookie of this run; None without one (or unreadable)."""
        member = member_of(pid, self.run_id)
        return int(member) if member is not None and member.isdigit() else None

    def use_cgroups(self) -> None:
        """Ranks get cgroups named as `_cgroup.RunCgroups` names them: members by cgroup."""
        self.cgroup_marker = f"/trio-dpsup-{self.run_id}/rank-".encode()

    def cgroup_rank(self, pid: int) -> int | None:
        """The rank whose cgroup `pid` is in; None without cgroups, or outside them."""
        if self.cgroup_marker is None:
            return None
        try:
            with open(f"/proc/{pid}/cgroup", "rb") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        for line in lines:
            if line.startswith(b"0::") and self.cgroup_marker in line:
                tail = line.rpartition(self.cgroup_marker)[2]
                return int(tail) if tail.isdigit() else None
        return None

    def walk(
        self, orphans: list[ProcStat] | None = None, *, every_thread: bool = True
    ) -> list[tuple[int, int, int]]:
        """Every live member reachable by children links from the rank processes (and, for
        a subreaper, from the orphans it adopted), recorded; returns the new ones as
        (pid, start, rank). Cheap: it reads only the trees' own /proc entries.

        `orphans` is a listing from `orphans()` this round already has (one listing, not
        two); None lists them here. Without `every_thread`, only each member's main thread
        is asked for its children: where fork() from the main thread puts them, and where
        the kernel moves the children of a thread that exits. An engine process has dozens
        of threads (torch's OpenMP pool is one per core): over 8 CUDA torch processes of 33
        threads, a walk once a second cost 1.9 to 2.6 ms asking every thread and about
        0.5 ms asking main threads (`python -m bench.tree_walk_torch`, H100 machine), so the
        tree watch asks every thread one round in a few only.

        A member met before is read through descriptors kept open since (`_visit`): a
        read of its stat and one of its children a round, where reading them by path is
        two opens, two reads and two closes (`python -m bench.idle_parts`). `close`
        closes them; a member the walk no longer reaches, or a zombie, is closed at once.
        """
        new: list[tuple[int, int, int]] = []
        reached: set[int] = set()
        starts = [(r.pid, r.rank, r.start) for r in self.roots]
        starts.extend((stat.pid, rank, stat.start) for stat, rank in self.adopted(orphans))
        for top, rank, top_start in starts:
            todo = [(top, 0)]
            while todo:
                pid, depth = todo.pop()
                member = self._visit(pid, top_start if depth == 0 else None, every_thread)
                if member is None:
                    continue  # gone (a top whose pid now names another process is gone too)
                start, children = member
                reached.add(pid)
                if self.remember(pid, start, rank):
                    new.append((pid, start, rank))
                if depth < _MAX_DEPTH:
                    todo.extend((child, depth + 1) for child in children)
        for pid in self._watched.keys() - reached:
            self._unwatch(pid)
        return new

    def _visit(
        self, pid: int, start: int | None, every_thread: bool
    ) -> tuple[int, list[int]] | None:
        """A live member's start and children; None if `pid` is gone, a zombie, or (with
        `start`) now another process.

        The first time, its files are opened and kept (`_Kept`: beyond MAX_WATCHED members,
        read by path); later, a read of each is all a round costs (of its stat alone, when
        every thread's children are read by path).
        """
        if (kept := self._watched.get(pid)) is not None:
            stat = _parse_stat(pid, _pread(kept.stat)) if start in (None, kept.start) else None
            if stat is not None and not stat.zombie:
                if every_thread:
                    return kept.start, children_of(pid)
                data = _pread(kept.children, whole=True)
                if data is not None:
                    return kept.start, _pids(data)
            self._unwatch(pid)
            if stat is not None:
                return None  # a zombie, or gone since its stat was read
        opened = _Kept.open(pid) if len(self._watched) < MAX_WATCHED else None
        stat = read_stat(pid) if opened is None else opened[0]
        data = None
        if stat is not None and not stat.zombie and start in (None, stat.start):
            if opened is None:
                data = _read(f"/proc/{pid}/task/{pid}/children", whole=True)
            else:
                data = _pread(opened[1].children, whole=True)
        if stat is None or data is None:
            if opened is not None:
                opened[1].close()
            return None
        if opened is not None:
            self._watched[pid] = opened[1]
        return stat.start, children_of(pid) if every_thread else _pids(data)

    def _unwatch(self, pid: int) -> None:
        self._watched.pop(pid).close()

    def close(self) -> None:
        """Close the descriptors the walks keep (a later walk opens them again)."""
        for pid in list(self._watched):
            self._unwatch(pid)

    def adopted(self, orphans: list[ProcStat] | None = None) -> list[tuple[ProcStat, int]]:
        """The live orphans this subreaper adopted, with their rank (from the registry or
        the cookie; ADOPTED where neither tells). Zombies are left to `reap`. `orphans`: a
        listing this round already has; None lists them here."""
        found: list[tuple[ProcStat, int]] = []
        for stat in self.orphans() if orphans is None else orphans:
            if stat.zombie:
                continue
            rank = self.seen.get((stat.pid, stat.start))
            if rank is None:
                rank = self.cookie_rank(stat.pid)
            found.append((stat, ADOPTED if rank is None else rank))
        return found

    def orphans(self, started: Iterable[int] = ()) -> list[ProcStat]:
        """Our children that we did not start, zombies included: rank processes, the
        guardian (`exclude`) and `started` are not orphans. Empty unless this process is a
        subreaper."""
        if self.adopter is None:
            return []
        own = {r.pid for r in self.roots} | self.exclude | set(started)
        # The kernel hands an orphan to the subreaper's first live thread, its main thread
        # while the process runs (find_new_reaper and find_alive_thread, kernel/exit.c):
        # one children file, not one per thread.
        data = _read(f"/proc/{self.adopter}/task/{self.adopter}/children", whole=True) or b""
        stats = (read_stat(int(pid)) for pid in data.split() if int(pid) not in own)
        return [stat for stat in stats if stat is not None]

    def scan(
        self, on_member: Callable[[ProcStat, int], None] | None = None
    ) -> dict[int, tuple[ProcStat, int]]:
        """One pass over the process table: every live member, pid -> (stat, rank).

        `on_member` is called as soon as a member is recognised (the kill passes use it, so
        that a process that keeps forking has microseconds, not a whole pass, to move on).
        """
        seen, live_roots, since = self._snapshot()
        members: dict[int, tuple[ProcStat, int]] = {}

        def found(stat: ProcStat, rank: int) -> None:
            members[stat.pid] = (stat, rank)
            if on_member is not None:
                on_member(stat, rank)

        # Newest first: a process that forks in a loop has the highest pid, and is met
        # microseconds after the listing instead of after a pass over the whole table.
        stats: dict[int, ProcStat] = {}
        for pid in sorted((int(e) for e in os.listdir("/proc") if e.isdigit()), reverse=True):
            stat = read_stat(pid)
            if stat is None:
                continue
            stats[pid] = stat
            if pid in self.exclude or stat.zombie:
                continue
            rank = self._classify(stat, seen, live_roots, since)
            if rank is not None:
                found(stat, rank)
        # Descendants of members, by parent links, until nothing new is found.
        for _ in range(_MAX_DEPTH):
            grew = False
            for stat in stats.values():
                if stat.pid in members or stat.pid in self.exclude or stat.zombie:
                    continue
                parent = members.get(stat.ppid)
                if parent is not None:
                    found(stat, parent[1])
                    grew = True
            if not grew:
                break
        return members

    def owner(self, pid: int) -> int | None:
        """The rank whose tree `pid` is in (ADOPTED: one of them), or None: not ours.

        For a handful of pids (NVML's): it reads `pid`'s /proc entries and its ancestors',
        not the whole table. Raises ProcessLookupError if /proc has no such pid.
        """
        stat = read_stat(pid)
        if stat is None:
            raise ProcessLookupError(pid)
        seen, live_roots, since = self._snapshot()
        for _ in range(_MAX_DEPTH):
            if stat.pid not in self.exclude:
                rank = self._classify(stat, seen, live_roots, since)
                if rank is not None:
                    return rank
            if stat.ppid <= 1:
                return None
            parent = read_stat(stat.ppid)
            if parent is None:
                return None
            stat = parent
        return None

    def _snapshot(self) -> tuple[dict[Key, int], list[Root], int]:
        """What a pass reads, copied (the event loop may change it meanwhile): the
        registry, the roots whose session and group ids still mean their rank, and the
        start time of the oldest rank (nothing older can be a member by cookie)."""
        roots = list(self.roots)
        since = min((r.start for r in roots), default=0)
        return dict(self.seen), [r for r in roots if _holds(r)], since

    def _classify(
        self, stat: ProcStat, seen: dict[Key, int], roots: list[Root], since: int
    ) -> int | None:
        """The rank `stat`'s process belongs to by rules 1, 2, 3 and 5 (not by parents)."""
        key = (stat.pid, stat.start)
        rank = seen.get(key)
        if rank is not None:
            return rank
        for root in roots:
            # A session or group id cannot be reused while any process still carries it,
            # and a member cannot be older than its rank.
            if root.pid in (stat.sid, stat.pgrp) and stat.start >= root.start:
                return root.rank
        # Older than every rank: not of its tree by cookie or cgroup; nor one read before.
        if stat.start >= since and key not in self._no_cookie:
            rank = self.cgroup_rank(stat.pid)
            if rank is None:
                rank = self.cookie_rank(stat.pid)
            if rank is not None:
                return rank
            self._no_cookie.add(key)
        if self.adopter is not None and stat.ppid == self.adopter:
            return ADOPTED
        return None

    # -- killing --------------------------------------------------------------------------

    def kill_members(self, ranks: Iterable[int] | None = None, *, scan: bool = True) -> int:
        """SIGKILL the members of `ranks` (None: of every rank, and adopted orphans of no
        known rank), in passes until a pass finds none; return how many were killed.

        Each pass kills a process the moment it is recognised, through a pidfd opened and
        checked against the start time (never a reused pid). A subreaper's own children
        are killed first, with no scan: a process that forks and exits in a loop re-parents
        to us at each step and is caught there. Without `scan`, only that cheap part runs.
        Returns once those killed have exited (at most EXIT_TIMEOUT seconds more).
        """
        wanted = None if ranks is None else set(ranks)
        killed = 0
        dying: dict[Key, int] = {}

        def kill(stat: ProcStat, rank: int) -> None:
            nonlocal killed
            if wanted is None or rank in wanted:
                killed += kill_process(stat.pid, stat.start, dying)

        try:
            for _ in range(MAX_KILL_PASSES):
                before = killed
                for _ in range(_MAX_DEPTH):
                    adopted = [
                        stat for stat, rank in self.adopted() if wanted is None or rank in wanted
                    ]
                    for stat in adopted:
                        killed += kill_process(stat.pid, stat.start, dying)
                    if not adopted:
                        break
                if scan:
                    self.scan(kill)
                if killed == before:
                    break
        finally:
            wait_exited(dying, EXIT_TIMEOUT)
        return killed

    def kill_groups(self) -> None:
        """SIGKILL every rank's process group at once (atomic against fork, unlike a scan),
        while its leader is still the process recorded (pid and start time)."""
        for root in self.roots:
            # Only while its leader is the very process recorded: a group whose leader is
            # gone may be led by a reused pid's process (its members are found by the scan
            # that follows, by session and registry).
            stat = read_stat(root.pid)
            if stat is None or stat.start != root.start:
                continue
            with contextlib.suppress(OSError):
                os.killpg(root.pid, signal.SIGKILL)

    @staticmethod
    def reap(orphans: Iterable[ProcStat]) -> list[int]:
        """Reap the zombies among `orphans` (a listing from `orphans(started)`); return
        their pids.

        The listing must have excluded the pids this process started itself and has not
        reaped, and none may be started between the listing and this call: the caller
        holds Spawner.lock across both.
        """
        reaped = []
        for stat in orphans:
            if stat.zombie:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(stat.pid, os.WNOHANG)[0] == stat.pid:
                        reaped.append(stat.pid)
        return reaped


def kill_process(pid: int, start: int, dying: dict[Key, int] | None = None) -> int:
    """SIGKILL the process (pid, start) if it still is that process; 1 if signalled.

    With `dying`, the pidfd of a process signalled stays open in it, by (pid, start), for
    `wait_exited`: SIGKILL is delivered, not done, when the call returns."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return 0
    kept = False
    try:
        stat = read_stat(pid)  # after the pidfd: it now names one process for good
        if stat is None or stat.start != start or stat.zombie:
            return 0
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        if dying is not None and (pid, start) not in dying and len(dying) < MAX_DYING:
            dying[(pid, start)] = pidfd
            kept = True
        return 1
    except OSError:
        return 0
    finally:
        if not kept:
            os.close(pidfd)


def wait_exited(dying: dict[Key, int], timeout: float) -> None:
    """Return once every process of `dying` (from `kill_process`) has exited, its pidfd
    readable, or after `timeout` seconds; close the pidfds. A killed process holds its
    files, locks and memory until it has exited: a stop that says it is done must not be
    ahead of that (a process in the kernel, a GPU driver's teardown, a loaded machine)."""
    poller = select.poll()
    for pidfd in dying.values():
        poller.register(pidfd, select.POLLIN)
    left = len(dying)
    deadline = time.monotonic() + timeout
    try:
        while left and (remaining := deadline - time.monotonic()) > 0:
            for pidfd, _ in poller.poll(remaining * 1000):
                poller.unregister(pidfd)
                left -= 1
    finally:
        for pidfd in dying.values():
            os.close(pidfd)
        dying.clear()


def _same(key: Key) -> bool:
    stat = read_stat(key[0])
    return stat is not None and stat.start == key[1] and not stat.zombie


def _holds(root: Root) -> bool:
    """Whether `root`'s session and group ids still mean that rank: its pid is unused, or
    used by that very process (a reused pid leads someone else's session)."""
    stat = read_stat(root.pid)
    return stat is None or stat.start == root.start
