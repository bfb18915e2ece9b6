"""A cgroup (v2) per rank, where this process may create them: ``--cgroups``.

A cgroup is the one membership a process cannot leave by itself: setsid, a double fork,
setproctitle and ``env -i`` all keep it in its rank's cgroup, and writing ``1`` to the
cgroup's ``cgroup.kill`` kills every process in it at once, including one that forks in a
loop. It needs a writable cgroup v2 hierarchy: a systemd unit with ``Delegate=yes``, a
privileged container, or root on a host with cgroup v2 (or the hybrid layout's
``/sys/fs/cgroup/unified``). Only process placement is used, no controllers, so the
cgroup v2 rule against processes in inner nodes does not apply.

Layout: ``<our cgroup>/trio-dpsup-<run id>/rank-<r>``. Standard library only: the guardian
imports it.
"""

from __future__ import annotations

import contextlib
import os
import signal

__all__ = ["CgroupError", "RunCgroups", "kill_cgroup", "own_cgroup_dir"]


class CgroupError(OSError):
    """No writable cgroup v2 here; the message says why."""


def own_cgroup_dir() -> str:
    """The folder of this process's own cgroup v2; raises CgroupError where there is none."""
    mount = root = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                before, _, after = line.partition(" - ")
                if after.split()[:1] == ["cgroup2"]:
                    fields = before.split()
                    root, mount = fields[3], fields[4]
                    break
        with open("/proc/self/cgroup") as f:
            path = next((line[3:].strip() for line in f if line.startswith("0::")), None)
    except OSError as exc:
        raise CgroupError(f"cannot read this process's cgroups: {exc}") from exc
    if mount is None or root is None or path is None:
        raise CgroupError("no cgroup v2 hierarchy is mounted here")
    if root != "/" and path.startswith(root):
        path = path[len(root) :]
    return os.path.join(mount, path.lstrip("/"))


class RunCgroups:
    """The cgroups of one run, made by `create`; `remove` takes them away once empty."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    @classmethod
    def create(cls, run_id: str) -> RunCgroups:
        """Make the run's folder; raises CgroupError naming why that is not possible."""
        parent = own_cgroup_dir()
        run_dir = os.path.join(parent, f"trio-dpsup-{run_id}")
        try:
            os.mkdir(run_dir)
        except OSError as exc:
            raise CgroupError(f"cannot create a cgroup in {parent}: {exc.strerror}") from exc
        return cls(run_dir)

    def rank_dir(self, rank: int) -> str:
        """Rank `rank`'s folder, made on first use (a restarted rank reuses it)."""
        path = os.path.join(self.run_dir, f"rank-{rank}")
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        return path

    def remove(self) -> None:
        """Kill what is left in every rank's cgroup and remove the folders (best effort)."""
        with contextlib.suppress(OSError):
            for entry in os.listdir(self.run_dir):
                path = os.path.join(self.run_dir, entry)
                if os.path.isdir(path):
                    kill_cgroup(path)
                    with contextlib.suppress(OSError):
                        os.rmdir(path)
            os.rmdir(self.run_dir)


def enter_cgroup(path: str) -> None:
    """Move the calling process into the cgroup at `path` (a rank's preexec step)."""
    fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
    try:
        os.write(fd, b"0\n")
    finally:
        os.close(fd)


def cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def kill_cgroup(path: str) -> None:
    """SIGKILL every process in the cgroup at `path`: through cgroup.kill (Linux 5.14+),
    else pid by pid in a few passes."""
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
        return
    except OSError:
        pass
    for _ in range(20):
        pids = cgroup_pids(path)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
