"""The promise tried as an adversary would: no process escapes its rank's tree, no code runs
from the working directory, nothing blocks the event loop.

Escapees hold a shared flock on a lock file (the fake rank's ``--lock-file``): taking it
exclusively proves that every one of them is dead, whatever pid or name it has by then.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import trio

from trio_dpsup.testing import free_port_range, open_cli_supervisor, read_pid_file, wait_pids_gone

from .conftest import all_holders_gone, cli_args, describe_holders, holders_now, kill_holders

pytest.importorskip("setproctitle", reason="the setproctitle test extra is not installed")


@contextmanager
def lock_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "tree.lock"
    path.touch()
    yield path


def grandchild_args(lock: Path, *kinds: str) -> list[str]:
    return ["--lock-file", str(lock), *(arg for kind in kinds for arg in ("--grandchild", kind))]


async def test_renamed_and_scrubbed_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    # Engine-like children that renamed themselves (setproctitle: the cookie is gone from
    # /proc) or were started with env -i stay in the rank's session: the guardian kills by
    # session and group too, not by cookie alone.
    with lock_file(tmp_path) as lock:
        base = free_port_range(2)
        args = cli_args(2, base, rank_args=grandchild_args(lock, "setproctitle", "env-i"))
        try:
            async with open_cli_supervisor(args) as sup:
                await sup.wait_ready()
                assert holders_now(lock)
                sup.send_signal(signal.SIGKILL)
                assert await sup.wait() == -signal.SIGKILL
                assert await all_holders_gone(lock, within=10)
        finally:
            kill_holders(lock)


async def test_children_that_left_the_session_and_the_cookie_are_stopped(
    tmp_path: Path,
) -> None:
    # setsid + double fork + setproctitle or env -i: no session, no parent link, no cookie.
    # The CLI is a child subreaper, so they re-parent to it: adopted orphans of the run.
    with lock_file(tmp_path) as lock:
        base = free_port_range(2)
        kinds = ("setsid-setproctitle", "setsid-env-i")
        args = cli_args(2, base, rank_args=grandchild_args(lock, *kinds))
        try:
            async with open_cli_supervisor(args) as sup:
                await sup.wait_ready()
                assert holders_now(lock)
                sup.send_signal(signal.SIGTERM)
                assert await sup.wait() == 0
                assert not holders_now(lock), sup.log
                assert "stopped cleanly" in sup.log
        finally:
            kill_holders(lock)


# From a thread: the tree watch asks only main threads for their children in most rounds,
# and every thread in some; either way the member is recorded before it escapes.
@pytest.mark.parametrize("kind", ["escape", "escape-from-thread"])
async def test_a_member_that_escapes_after_it_was_seen_dies_with_a_killed_supervisor(
    tmp_path: Path, kind: str
) -> None:
    # Seen by the tree watch while it had the cookie and the session, then setsid and
    # setproctitle: the guardian knows it by pid and start time (the registry).
    with lock_file(tmp_path) as lock:
        fifo = tmp_path / "escape"
        os.mkfifo(fifo)
        os.mkfifo(f"{fifo}.done")
        pid_file = tmp_path / "pids"
        base = free_port_range(1)
        rank_args = [
            *grandchild_args(lock, kind),
            "--escape-fifo", str(fifo),
            "--pid-file", str(pid_file),
        ]  # fmt: skip
        options = ["--log-level", "DEBUG", "--tree-watch-interval", "0.1"]
        args = cli_args(1, base, options=options, rank_args=rank_args)
        try:
            async with open_cli_supervisor(args) as sup:
                await sup.wait_ready()
                pid = read_pid_file(pid_file)[f"grandchild-{kind}"]
                await sup.wait_for_line(rf"tree member pid {pid} recorded")
                with trio.fail_after(10):  # FIFOs block until the other end opens
                    go, done = Path(fifo).write_bytes, Path(f"{fifo}.done").read_bytes
                    await trio.to_thread.run_sync(go, b"go", abandon_on_cancel=True)
                    await trio.to_thread.run_sync(done, abandon_on_cancel=True)
                escaped = psutil.Process(pid)
                assert os.getsid(pid) == pid  # out of the rank's session
                environ = Path(f"/proc/{pid}/environ").read_bytes()  # noqa: ASYNC240
                assert b"TRIO_DPSUP_TREE" not in environ  # setproctitle wrote over it
                sup.send_signal(signal.SIGKILL)
                assert await sup.wait() == -signal.SIGKILL
                assert await all_holders_gone(lock, within=10)
                # Its lock goes with its files, early in its exit: wait for the rest.
                assert await wait_pids_gone([escaped.pid], timeout=10) == []
        finally:
            kill_holders(lock)


async def test_a_process_that_forks_and_exits_in_a_loop_is_stopped(tmp_path: Path) -> None:
    # A new pid and a new session every 2 ms, the cookie kept: it outruns any one scan of
    # the process table, so it is killed on sight, and as an orphan we adopt at each step.
    with lock_file(tmp_path) as lock:
        base = free_port_range(1)
        args = cli_args(1, base, rank_args=grandchild_args(lock, "hopper"))
        try:
            async with open_cli_supervisor(args) as sup:
                await sup.wait_ready()
                assert holders_now(lock)
                sup.send_signal(signal.SIGTERM)
                await sup.wait_for_line("stopped cleanly")
                assert not holders_now(lock), describe_holders(lock) + sup.log
                assert await sup.wait() == 0
        finally:
            kill_holders(lock)


def zombie_children(pid: int) -> list[int]:
    return [
        child.pid
        for child in psutil.Process(pid).children()
        if child.status() == psutil.STATUS_ZOMBIE
    ]


async def test_adopted_orphans_are_reaped(tmp_path: Path) -> None:
    # The rank double-forks a helper that exits at once every 50 ms: 40 orphans in 2 s, all
    # adopted by the CLI (a child subreaper), which must reap them.
    base = free_port_range(1)
    options = ["--tree-watch-interval", "0.1"]
    args = cli_args(1, base, options=options, rank_args=["--grandchild", "orphan-churn"])
    async with open_cli_supervisor(args) as sup:
        await sup.wait_ready()
        await trio.sleep(2)  # the soak under test: 40 orphans come and go meanwhile
        zombies = zombie_children(sup.pid)
        assert len(zombies) <= 10, zombies
        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 0


async def test_the_guardian_runs_no_code_from_the_working_directory(tmp_path: Path) -> None:
    # A package planted where the supervisor is started: the console script does not put
    # the working directory on the path, and neither may the guardian it starts.
    planted = tmp_path / "trio_dpsup"
    planted.mkdir()
    marker = tmp_path / "planted-code-ran"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (planted / "_guardian_process.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    script = Path(sys.executable).parent / "trio-dpsup"
    if not script.exists():
        pytest.skip("the trio-dpsup console script is not installed next to this Python")
    with lock_file(tmp_path) as lock:
        base = free_port_range(1)
        args = cli_args(1, base, rank_args=grandchild_args(lock, "setsid"))
        # The ranks too run with -P, so that only the guardian could run the planted code.
        args.insert(args.index("-m", args.index("--")), "-P")
        try:
            async with open_cli_supervisor(args, program=[str(script)], cwd=str(tmp_path)) as sup:
                await sup.wait_ready()
                sup.send_signal(signal.SIGKILL)
                assert await sup.wait() == -signal.SIGKILL
                # The real guardian did its work: the setsid grandchild is gone.
                assert await all_holders_gone(lock, within=10)
            assert not marker.exists()
        finally:
            kill_holders(lock)


async def test_secrets_stay_out_of_status_and_logs() -> None:
    secret = "hunter2-s3cret"
    base = free_port_range(1)
    args = cli_args(1, base, options=["--log-format", "json", "--secret-option=-k"])
    rank = f"exec {sys.executable} -m trio_dpsup.testing.fake_rank --port $1"
    args = [
        *args[: args.index("--") + 1],
        "sh", "-c", f"{rank} # --api-key {secret}", "sh", "{port}",
        "--api-key", secret, "-k", secret, "--pass", secret,
        "-H", f"Authorization: Bearer {secret}",
        "--hf-overrides", f'{{"api_key": "{secret}"}}',
        "--model-url", f"https://user:{secret}@example.invalid/m",
    ]  # fmt: skip
    async with open_cli_supervisor(args) as sup:
        await sup.wait_ready()
        status = await sup.status_document()
        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 0
    assert "***" in str(status["ranks"])
    assert secret not in str(status)
    assert secret not in sup.log


async def test_idle_connections_cannot_starve_the_probes() -> None:
    # The supervisor may open 1024 files; a client holds 1200 idle connections to its
    # control plane. Connections are capped and the least recently active is closed to
    # make room, so every probe is still answered.
    idle = 1200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < idle + 200:
        pytest.skip(f"this test holds {idle} connections; the hard open-file limit is {hard}")
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, idle + 200), hard))
    base = free_port_range(1)
    prlimit = ["prlimit", "--nofile=1024:1024", "--"]
    held: list[socket.socket] = []
    try:
        async with open_cli_supervisor(cli_args(1, base), prefix=prlimit) as sup:
            url = await sup.wait_ready()
            host, port = url.removeprefix("http://").rsplit(":", 1)
            for _ in range(idle):
                # Each has made a request and is kept alive, idle, as a pooling client's.
                sock = socket.create_connection((host, int(port)), timeout=5)
                held.append(sock)
                try:
                    sock.sendall(b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n")
                    sock.recv(4096)
                except OSError:
                    pass  # evicted, or never accepted: either way it holds a descriptor
            # The supervisor keeps a reserve of open files below its limit, whatever the
            # clients do: ranks, probes and restarts need descriptors too.
            assert psutil.Process(sup.pid).num_fds() < 1024 - 256
            # A kubelet's probe gives up after 1 s (its default timeoutSeconds).
            async with httpx.AsyncClient(base_url=url, timeout=1) as client:
                for _ in range(20):
                    # A new connection each time, as a kubelet probe makes.
                    response = await client.get("/ready", headers={"connection": "close"})
                    assert response.status_code == 200
            assert "accept failed" not in sup.log
            sup.send_signal(signal.SIGTERM)
            assert await sup.wait() == 0
    finally:
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def dead_process() -> tuple[int, int]:
    """The pid and start time of a process that has exited (and been reaped)."""
    from trio_dpsup._proc.membership import read_stat  # /proc's start time, as Trees reads it

    child = subprocess.Popen(["sleep", "60"])
    stat = read_stat(child.pid)
    assert stat is not None
    child.kill()
    child.wait()
    return child.pid, stat.start


def test_restart_records_of_the_dead_are_pruned() -> None:
    # A unit test of Trees on purpose (private): the records a restart leaves must not
    # pile up, since every tree-watch round and the guardian read them all.
    from trio_dpsup._proc.membership import Trees, read_stat

    trees = Trees("unit")
    for _ in range(50):  # fifty rank processes that exited (restarts)
        trees.add_root(0, *dead_process())
    alive = subprocess.Popen(["sleep", "60"])
    try:
        stat = read_stat(alive.pid)
        assert stat is not None
        trees.add_root(0, alive.pid, stat.start)
        trees.prune()
        assert [(r.pid, r.start) for r in trees.roots] == [(alive.pid, stat.start)]
        assert set(trees.seen) == {(alive.pid, stat.start)}
    finally:
        alive.kill()
        alive.wait()
    trees.prune()
    assert trees.roots == []


def test_the_walk_keeps_a_members_files_open_and_closes_them_once_it_is_gone() -> None:
    # A unit test of Trees on purpose (private): the tree watch reads a known member
    # through descriptors it keeps (two reads a round, not six syscalls by path); they
    # must not outlive the member, nor the watch.
    from trio_dpsup._proc.membership import Trees

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    script = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(parent.pid).children():
            assert time.monotonic() < deadline, "the parent never started its child"
            time.sleep(0.01)
        (child,) = psutil.Process(parent.pid).children()
        trees = Trees("unit")
        trees.add_root(0, parent.pid)
        before = open_fds()
        assert [pid for pid, _, _ in trees.walk(every_thread=False)] == [child.pid]
        assert open_fds() == before + 4  # a stat and a children file per member
        for every_thread in (False, True):  # known now: read through what is kept
            assert trees.walk(every_thread=every_thread) == []
            assert open_fds() == before + 4
        child.kill()  # a zombie of its parent: still listed, no longer a member to watch
        while child.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline + 10, "the child never exited"
            time.sleep(0.01)
        assert trees.walk(every_thread=False) == []
        assert open_fds() == before + 2
        parent.kill()
        parent.wait()  # both gone (the zombie with its parent)
        assert trees.walk(every_thread=False) == []
        assert open_fds() == before
        trees.walk(every_thread=False)
        trees.close()
        assert open_fds() == before
    finally:
        parent.kill()
        parent.wait()


def test_the_kill_passes_return_once_those_they_killed_have_exited(tmp_path: Path) -> None:
    # A unit test of Trees on purpose (private): SIGKILL is delivered, not done, when it is
    # sent. A member with memory to give back (1 GiB here; an engine has far more) holds
    # its files and locks for a fifth of a second after it: a stop that says it is done
    # must not be ahead of that (the forks-in-a-loop test once found the lock still held).
    from trio_dpsup._proc.membership import Trees

    lock = tmp_path / "member.lock"
    lock.touch()
    member = (
        "import fcntl, mmap, os, sys, time\n"
        "fcntl.flock(os.open(sys.argv[1], os.O_RDONLY), fcntl.LOCK_SH)\n"
        "flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE\n"
        "memory = mmap.mmap(-1, 1 << 30, flags=flags)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", member, str(lock)],
        stdout=subprocess.PIPE,
        start_new_session=True,
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline() == b"ready\n"
            trees = Trees("unit")
            trees.add_root(0, process.pid)
            assert trees.kill_members([0]) >= 1
            assert not holders_now(lock), describe_holders(lock)
        finally:
            process.kill()


def test_waiting_for_the_killed_is_bounded_and_closes_their_pidfds() -> None:
    # A unit test of the kill passes' wait on purpose (private): a process that does not
    # exit (here: not killed at all) holds the wait only until its timeout, and every pidfd
    # is closed, whether its process exited or not.
    from trio_dpsup._proc.membership import kill_process, read_stat, wait_exited

    with (
        subprocess.Popen(["sleep", "60"]) as stays,
        subprocess.Popen(["sleep", "60"]) as killed,
    ):
        try:
            stat = read_stat(killed.pid)
            assert stat is not None
            dying: dict[tuple[int, int], int] = {}
            assert kill_process(killed.pid, stat.start, dying) == 1
            dying[(stays.pid, 0)] = os.pidfd_open(stays.pid)
            pidfds = list(dying.values())
            started = time.monotonic()
            wait_exited(dying, 0.5)
            assert 0.5 <= time.monotonic() - started < 5
            assert dying == {}
            for pidfd in pidfds:
                with pytest.raises(OSError, match="Bad file descriptor"):
                    os.fstat(pidfd)
            assert killed.wait(5) == -signal.SIGKILL
            assert stays.poll() is None
        finally:
            stays.kill()
            killed.kill()


def test_a_dead_rank_whose_member_lives_is_kept() -> None:
    # A unit test of Trees on purpose (private): the rank's process died but a member of
    # its tree lives on: the record is still needed to find that member by session.
    from trio_dpsup._proc.membership import Trees, read_stat

    trees = Trees("unit")
    root_pid, root_start = dead_process()
    trees.add_root(0, root_pid, root_start)
    member = subprocess.Popen(["sleep", "60"])
    try:
        member_stat = read_stat(member.pid)
        assert member_stat is not None
        trees.remember(member.pid, member_stat.start, 0)
        trees.prune()
        assert [r.pid for r in trees.roots] == [root_pid]
    finally:
        member.kill()
        member.wait()
    trees.prune()
    assert trees.roots == []


def test_the_guardian_prunes_what_names_only_the_dead() -> None:
    # A unit test of the guardian's reader on purpose (private): a run restarted thousands
    # of times streams a root line per restart; the guardian's registry stays bounded.
    from trio_dpsup._proc.guardian_process import PRUNE_EVERY, read_registry
    from trio_dpsup._proc.membership import Trees

    pid, start = dead_process()
    trees = Trees("unit")
    # The same dead process, as a root, over and over.
    lines = [f"root 0 {pid} {start}\n".encode()] * (PRUNE_EVERY * 4 + 1)
    read_registry(trees, lines)
    assert len(trees.roots) <= PRUNE_EVERY
