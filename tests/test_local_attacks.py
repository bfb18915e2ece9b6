"""What a local user on the same host, or a tired operator, could do to the operator
surfaces: planted links and FIFOs in the log directory, hostile admin requests and paths,
secrets printed by ranks, endless request bodies, bad input that used to start things.
Each case was seen to break commit c84b649."""

from __future__ import annotations

import json
import os
import resource
import socket
import stat
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from trio_dpsup import RankExited
from trio_dpsup.testing import CLI, Form, Harness, free_port_range, run_cli

from .conftest import cli_args
from .test_admin import ctl

pytest_plugins = ["trio_dpsup.testing.plugin"]

SECRET = "hunter2-S3cret-value"

#: A rank that prints secrets in three spellings on stderr, then exits 3.
LEAKY = (
    "import sys; "
    f"print('api_key={SECRET}', 'Authorization: Bearer {SECRET}', "
    f"'postgres://app:{SECRET}@db/x', sep='\\n', file=sys.stderr); sys.exit(3)"
)


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")


def one_rank(base: int, *options: str) -> list[str]:
    return cli_args(1, base, options=options)


def printing_rank(log_dir: Path, program: str, *options: str) -> list[str]:
    """The CLI's arguments for one rank that runs the Python `program`, its lines also in
    `log_dir`, with no startup deadline."""
    return [
        "--ranks", "1", "--gpus-per-rank", "0", "--base-port", str(free_port_range(1)),
        "--control-port", "0", "--startup-timeout", "0", "--log-dir", str(log_dir), *options,
        "--", sys.executable, "-c", program,
    ]  # fmt: skip


# -- the log directory


async def test_planted_links_in_the_log_dir_are_not_followed(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir(mode=0o750)
    victim = tmp_path / "victim"
    victim.write_text("root only\n")
    (log_dir / "rank-0.log").symlink_to(victim)
    (log_dir / "rank-1.log").symlink_to(tmp_path / "created-by-us")
    for rank in (0, 1):  # one rank a run, so that each surely writes its line
        program = "print('line of {rank}'); raise SystemExit(3)"
        code, _, err = await run_cli(printing_rank(log_dir, program, "--start-rank", str(rank)))
        assert code == 3
        assert f"rank-{rank}.log: a symbolic link, not followed" in err
    assert victim.read_text() == "root only\n", "a planted link was written through"
    assert not (tmp_path / "created-by-us").exists(), "a dangling link created a file"


async def test_a_fifo_at_a_log_file_stops_no_output(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir(mode=0o700)
    fifo = log_dir / "rank-0.log"
    os.mkfifo(fifo)
    # A reader holds it open, as an attacker would: an open for writing would succeed.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        lines = 20000
        program = f"for i in range({lines}): print(i)\nraise SystemExit(3)"
        result = await run_cli(printing_rank(log_dir, program))
    finally:
        os.close(reader)
    assert result.returncode == 3
    out = result.stdout.splitlines()
    assert out == [f"[rank 0] {i}" for i in range(lines)], "every line on our stdout"
    assert "rank-0.log: not a regular file" in result.stderr


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        (0o777, "is writable by others (mode 0777): they could plant links or FIFOs there"),
        (0o1777, "is writable by others (mode 1777)"),
    ],
)
async def test_a_log_dir_others_can_write_is_refused(
    tmp_path: Path, mode: int, message: str
) -> None:
    log_dir = tmp_path / "shared"
    log_dir.mkdir()
    os.chmod(log_dir, mode)
    code, _, err = await run_cli([*one_rank(free_port_range(1), "--log-dir", str(log_dir))])
    assert code == 2
    assert message in err
    assert err.count("\n") == 1
    assert list(log_dir.iterdir()) == []


@ROOT_ONLY
async def test_a_log_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    log_dir = tmp_path / "theirs"
    log_dir.mkdir(mode=0o755)
    os.chown(log_dir, 65534, 65534)
    code, _, err = await run_cli([*one_rank(free_port_range(1), "--log-dir", str(log_dir))])
    assert code == 2
    assert "is owned by uid 65534, not by this user (0)" in err


@pytest.mark.parametrize("kind", ["link-to-dir", "dangling", "proc"])
async def test_a_log_dir_that_cannot_be_trusted_or_made_exits_2_before_listening(
    tmp_path: Path, kind: str
) -> None:
    target = tmp_path / "real"
    target.mkdir(mode=0o700)
    path = tmp_path / "logs"
    if kind == "link-to-dir":
        path.symlink_to(target)
        message = f"--log-dir {path} is a symbolic link: give the directory itself ({target})"
    elif kind == "dangling":
        path.symlink_to(tmp_path / "nowhere")
        message = f"--log-dir {path} is a symbolic link"
    else:
        path = Path("/proc/trio-dpsup-log")
        message = "--log-dir /proc/trio-dpsup-log: cannot create it:"
    control = free_port_range(1)
    args = one_rank(free_port_range(1), "--log-dir", str(path))
    args[args.index("--control-port") + 1] = str(control)
    code, _, err = await run_cli(args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert "listening" not in err, "refused before the control plane listened"


async def test_log_files_are_0640_and_a_missing_dir_is_made_0750(tmp_path: Path) -> None:
    log_dir = tmp_path / "made" / "logs"
    code, _, _ = await run_cli(printing_rank(log_dir, "print('x'); raise SystemExit(3)"))
    assert code == 3
    assert stat.S_IMODE(os.stat(log_dir).st_mode) == 0o750 & ~_umask()
    assert stat.S_IMODE(os.stat(log_dir / "rank-0.log").st_mode) == 0o640 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- secrets printed by ranks


@pytest.mark.parametrize("form", list(Form), ids=lambda form: form.value)
async def test_secrets_a_rank_prints_are_served_redacted(
    dpsup: Harness, form: Form, tmp_path: Path
) -> None:
    status_file = tmp_path / "status.json"
    deployment = await dpsup.start(
        1, form=form, command=[sys.executable, "-c", LEAKY], wait_ready=False,
        startup_timeout=0, status_file=str(status_file),
    )  # fmt: skip
    await deployment.wait_exit()
    assert isinstance(await deployment.failure(), RankExited)
    final = await deployment.final_status()
    assert final.root_cause is not None
    tail = "\n".join(final.root_cause.stderr_tail)
    assert SECRET not in tail
    assert "api_key=***" in tail
    assert "Authorization: ***" in tail
    assert "postgres://app:***@db/x" in tail
    text = status_file.read_text()
    assert "api_key=***" in text
    assert SECRET not in text
    assert stat.S_IMODE(os.stat(status_file).st_mode) == 0o640 & ~_umask()


async def test_evidence_is_redacted_and_private(dpsup: Harness, tmp_path: Path) -> None:
    evidence = tmp_path / "evidence"
    deployment = await dpsup.start(
        1, rank_args=["--api-key", SECRET], evidence_dir=str(evidence), evidence_timeout=1
    )
    await deployment.hang_health(0)
    await deployment.wait_exit()
    (folder,) = [p for p in evidence.glob("*/*") if p.is_dir()]
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700 & ~_umask()
    for file in folder.iterdir():
        assert stat.S_IMODE(os.stat(file).st_mode) == 0o600, file
        assert SECRET not in file.read_text(), file


#: Directories another user could plant in or swap: (owner, mode, what the refusal says).
#: Sticky (1777) protects what is ours from being renamed, not our name from being taken.
UNSAFE_DIRS = pytest.mark.parametrize(
    ("owner", "mode", "message"),
    [
        pytest.param(65534, 0o755, "is owned by uid 65534, not by this user", marks=ROOT_ONLY),
        (None, 0o777, "is writable by others (mode 0777)"),
        (None, 0o1777, "is writable by others (mode 1777)"),
    ],
)


@UNSAFE_DIRS
async def test_an_evidence_dir_others_could_plant_in_is_refused(
    tmp_path: Path, owner: int | None, mode: int, message: str
) -> None:
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    os.chmod(evidence, mode)
    if owner is not None:
        os.chown(evidence, owner, owner)
    code, _, err = await run_cli(one_rank(free_port_range(1), "--evidence-dir", str(evidence)))
    assert code == 2
    assert f"--evidence-dir {evidence} {message}" in err
    assert err.count("\n") == 1
    assert list(evidence.iterdir()) == []


@pytest.mark.parametrize("planted", ["link", pytest.param("theirs", marks=ROOT_ONLY)])
async def test_what_is_planted_in_the_evidence_dir_is_never_written_through(
    dpsup: Harness, tmp_path: Path, planted: str
) -> None:
    # The run's folder is named by its run id, which /status shows to anyone: a folder or
    # link planted at that name (here by us, standing in for whoever could) is refused.
    evidence = tmp_path / "evidence"
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    deployment = await dpsup.start(1, evidence_dir=str(evidence), evidence_timeout=1)
    if planted == "link":
        (evidence / deployment.run_id).symlink_to(victim)
    else:
        (evidence / deployment.run_id).mkdir(mode=0o755)
        os.chown(evidence / deployment.run_id, 65534, 65534)
    await deployment.hang_health(0)
    with trio.fail_after(20):
        assert await deployment.wait_exit() == 1
    assert list(victim.iterdir()) == [], "evidence was written through a planted link"
    assert [p for p in evidence.rglob("*") if not p.is_symlink() and p.is_file()] == []
    final = await deployment.final_status()
    assert final.ranks[0].evidence is None


async def test_a_usage_error_never_echoes_a_secret(tmp_path: Path) -> None:
    code, _, err = await run_cli(
        ["--ranks", "1", "--gpus-per-rank", "0", "--", "serve", f"--api-key={SECRET}{{nope}}"]
    )
    assert code == 2
    assert "unknown placeholder {nope} in '--api-key=***'" in err
    assert SECRET not in err
    # A health path can carry a token too (f2fe13b echoed it).
    code, _, err = await run_cli(
        ["--ranks", "1", "--gpus-per-rank", "0", "--health-path", f"/h x?token={SECRET}",
         "--", "serve"]
    )  # fmt: skip
    assert code == 2
    assert "no spaces or control characters" in err
    assert SECRET not in err


# -- the admin socket


async def admin_request(sock: Path, raw: bytes) -> dict[str, object]:
    stream = await trio.open_unix_socket(str(sock))
    async with stream:
        await stream.send_all(raw)
        data = b""
        with trio.fail_after(10):
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
    answer: dict[str, object] = json.loads(data)
    return answer


async def test_no_admin_request_can_stop_the_supervisor(dpsup: Harness, tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    deployment = await dpsup.start(2, admin_socket=str(sock))
    cases = [
        (b"[" * 4000 + b"\n", "a request nested deeper than 4 levels"),
        (b'{"action": "status", "x": ' + b"[" * 5 + b"]" * 5 + b"}\n", "nested deeper"),
        (b"x" * 5000 + b"\n", "a request longer than 4096 bytes"),
        (b"\xff\xfe\n", "not a JSON request"),
        (b'{"action": "restart", "rank": true}\n', "no rank True here"),
        (b'{"action": "drain", "rank": 0, "force": "yes"}\n', "force must be true or false"),
        (b'{"action": "pause-probes", "rank": 0, "seconds": "1e999"}\n', "pause-probes needs"),
    ]
    for raw, message in cases:
        answer = await admin_request(sock, raw)
        assert answer["ok"] is False
        assert message in str(answer["error"])
    status = await deployment.status()
    assert [r.state.value for r in status.ranks] == ["ready", "ready"]
    assert (await ctl(sock, "status"))[0] == 0


async def test_admin_connections_past_the_open_files_limit(tmp_path: Path) -> None:
    # A supervisor that may open few files, and a local user who opens admin connections
    # and never sends a line: accept() fails with EMFILE; the supervisor keeps serving.
    sock = tmp_path / "admin.sock"
    args = cli_args(1, free_port_range(1), options=["--admin-socket", str(sock)])

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (104, 104))  # the plan needs 102

    process = await trio.lowlevel.open_process(
        [*CLI, *args],  # no output read: run_cli and open_cli_supervisor read it
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=low_limit,
    )  # fmt: skip
    held: list[socket.socket] = []
    try:
        with trio.fail_after(30):
            while not sock.exists():  # noqa: ASYNC110
                await trio.sleep(0.05)  # the socket file appears once the supervisor listens
        with trio.move_on_after(10):
            while len(held) < 300:  # past the 104 files the supervisor may open
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                try:
                    client.connect(str(sock))
                except (BlockingIOError, ConnectionRefusedError):
                    client.close()
                    await trio.sleep(0.01)  # pacing: the backlog is full until it accepts
                    continue
                held.append(client)
        await trio.sleep(1.0)  # the period under test: the flood held open
        assert process.poll() is None, "the supervisor survived the flood"
    finally:
        for client in held:
            client.close()
    code, out, _ = await ctl(sock, "status")
    assert code == 0
    assert "ready" in out
    process.terminate()
    with trio.fail_after(30):
        assert await process.wait() == 0


@pytest.mark.parametrize("kind", ["file", "symlink", "live-socket", "full-backlog"])
async def test_an_admin_socket_path_that_is_taken_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "admin.sock"
    listener = None
    if kind == "file":
        path.write_text("keep me\n")
    elif kind == "symlink":
        (tmp_path / "target").write_text("keep me\n")
        path.symlink_to(tmp_path / "target")
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(0 if kind == "full-backlog" else 8)
    fillers = []
    try:
        if kind == "full-backlog":
            for _ in range(4):  # fill the backlog, so that a connect would wait
                filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                filler.setblocking(False)
                try:
                    filler.connect(str(path))
                except BlockingIOError:
                    filler.close()
                    break
                fillers.append(filler)
        code, _, err = await run_cli([*one_rank(free_port_range(1), "--admin-socket", str(path))])
    finally:
        for filler in fillers:
            filler.close()
        if listener is not None:
            listener.close()
    assert code == 2
    if kind in ("file", "symlink"):
        assert "exists and is " in err
        assert "it is never replaced" in err
        assert (tmp_path / ("admin.sock" if kind == "file" else "target")).read_text() == (
            "keep me\n"
        )
        assert path.is_symlink() == (kind == "symlink")
    else:
        assert "another process listens there" in err


@UNSAFE_DIRS
async def test_an_admin_socket_dir_another_user_could_change_is_refused(
    tmp_path: Path, owner: int | None, mode: int, message: str
) -> None:
    # That user could swap the socket for one of their own: a forged status for ctl, and
    # the operator's restart sent to them.
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    if owner is not None:
        os.chown(shared, owner, owner)
    path = shared / "admin.sock"
    code, _, err = await run_cli([*one_rank(free_port_range(1), "--admin-socket", str(path))])
    assert code == 2
    assert f"--admin-socket {path}: the directory {shared} {message}" in err
    assert list(shared.iterdir()) == []
    # ctl says no to such a path too, before a word is sent: here a listener stands in for
    # the other user's.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(8)
        listener.setblocking(False)
        code, out, err = await ctl(path, "status")
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert (code, out) == (2, "")
    assert f"the directory {shared} {message}" in err


@ROOT_ONLY
async def test_ctl_refuses_a_socket_served_by_another_user(tmp_path: Path) -> None:
    # The kernel's word (SO_PEERCRED) on who listens, whatever the files say: the listener
    # is bound here and listens in a process of uid 65534.
    path = tmp_path / "admin.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    reply = json.dumps({"ok": True, "action": "undrain", "rank": 0})
    # It becomes uid 65534 itself (that user may not run our interpreter), and answers the
    # two connections of this test: the refused ctl's (which sends nothing), then the other.
    server = f"""
import contextlib, os, socket
s = socket.socket(fileno={sock.fileno()})
os.setgid(65534)
os.setuid(65534)
s.listen(4)
for _ in range(2):
    c, _ = s.accept()
    with c, contextlib.suppress(OSError):
        if c.recv(4096):
            c.sendall({reply!r}.encode() + b"\\n")
"""
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(
                trio.run_process, [sys.executable, "-c", server], pass_fds=(sock.fileno(),),
                check=False,
            )
        )  # fmt: skip
        sock.close()
        with trio.fail_after(10):
            while True:  # until it listens: then a connect is accepted into its backlog
                code, _, err = await ctl(path, "undrain", "0")
                if "Connection refused" not in err:
                    break
                await trio.sleep(0.05)
        assert code == 2
        assert "is served by uid 65534" in err
        assert "--user 65534" in err
        # Named as the supervisor's user, it is believed.
        code, out, err = await ctl(path, "--user", "65534", "undrain", "0")
        assert (code, out, err) == (0, "rank 0 undrained\n", "")
        with trio.fail_after(10):
            assert await process.wait() == 0


async def test_idle_admin_clients_cannot_hold_every_slot(dpsup: Harness, tmp_path: Path) -> None:
    # 32 clients that connect and say nothing (the owner's own, or strangers on a socket
    # widened by mistake): one more is told "busy" at once, and the idle are dropped after
    # LINE_TIMEOUT, so that ctl gets through (on f2fe13b: "is it running?" for 5 s a round).
    from trio_dpsup._plane.admin_socket import LINE_TIMEOUT, MAX_CONNECTIONS  # its bounds

    sock = tmp_path / "admin.sock"
    await dpsup.start(1, admin_socket=str(sock))
    # Trio's sockets: the supervisor runs in this event loop, which must not block.
    idle = [await trio.open_unix_socket(str(sock)) for _ in range(MAX_CONNECTIONS)]
    try:
        # Until the server has taken them all: then one more client is the one too many.
        # That client speaks from this event loop, not as a ctl process: a process that
        # takes longer than LINE_TIMEOUT to start on a loaded machine would find the idle
        # already dropped, every time.
        with trio.fail_after(10):
            for _ in range(1000):  # bounded by the deadline too
                answer = await one_status_request(sock)
                if "busy" in answer:
                    break
                await trio.sleep(0.01)  # pacing: the server accepts them in turn
        assert f"busy: all {MAX_CONNECTIONS} admin connections are taken" in answer
        # The idle are dropped within LINE_TIMEOUT: each read ends (in EOF, or the answer
        # that the request did not arrive in time).
        with trio.fail_after(LINE_TIMEOUT + 5):
            for client in idle:
                await client.receive_some(4096)
        code, out, _ = await ctl(sock, "status")
        assert code == 0, out
    finally:
        for client in idle:
            await client.aclose()


async def one_status_request(sock: Path) -> str:
    """The first line a `status` request on a connection of its own is answered with."""
    stream = await trio.open_unix_socket(str(sock))
    async with stream:
        await stream.send_all(b'{"action": "status"}\n')
        received = b""
        while b"\n" not in received:  # bounded by the caller's deadline
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            received += chunk
    return received.partition(b"\n")[0].decode()


async def test_a_stale_admin_socket_is_replaced(dpsup: Harness, tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # nobody listens: a supervisor that died
    await dpsup.start(1, admin_socket=str(path))
    assert (await ctl(path, "status"))[0] == 0


async def fake_admin(path: Path) -> trio.SocketListener:
    """A Unix socket listening at `path`, for a server the test writes."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(8)
    return trio.SocketListener(sock)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"not json\n", "an answer that is not JSON: b'not json\\n'"),
        (b'{"ok": true}\n', "a malformed answer (a reply to status without status)"),
        (b"[1, 2]\n", "an answer that is not a JSON object"),
        (b'{"ok": "maybe"}\n', "a malformed answer (an answer without ok: true or false)"),
        (None, "no answer within 0.5s (--timeout)"),
    ],
)
async def test_ctl_says_one_line_and_exits_1_on_an_answer_it_cannot_use(
    tmp_path: Path, answer: bytes | None, message: str
) -> None:
    path = tmp_path / "fake.sock"
    listener = await fake_admin(path)

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(4096)
            if answer is None:
                await trio.sleep_forever()
            await stream.send_all(answer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve, [listener])
        code, out, err = await ctl(path, "--timeout", "0.5", "status")
        nursery.cancel_scope.cancel()
    assert (code, out) == (1, "")
    assert err.startswith("trio-dpsup ctl: error: ")
    assert message in err
    assert err.count("\n") == 1


# -- the control plane's request bodies


async def test_request_bodies_are_bounded(dpsup: Harness) -> None:
    deployment = await dpsup.start(1)
    host, port = deployment.control_url.removeprefix("http://").rsplit(":", 1)

    async def exchange(raw: bytes, *, trickle: bool = False) -> bytes:
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            if trickle:
                await stream.send_all(raw)
                # A body a byte at a time, slower than any real client: answered 408 in
                # bounded time, not held.
                with trio.move_on_after(30):
                    while True:
                        await stream.send_all(b"x")
                        data = await _receive_within(stream, 1.0)
                        if data:
                            return data
            else:
                await stream.send_all(raw)
            with trio.fail_after(10):
                return await stream.receive_some(65536)

    announced = b"POST /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
    assert (await exchange(announced)).startswith(b"HTTP/1.1 413 ")
    chunked = b"POST /ready HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += b"400\r\n" + b"x" * 1024 + b"\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n"
    assert (await exchange(chunked)).startswith(b"HTTP/1.1 413 ")
    slow = b"POST /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    with trio.fail_after(20):
        assert (await exchange(slow, trickle=True)).startswith(b"HTTP/1.1 408 ")
    small = b"GET /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok"
    assert (await exchange(small)).startswith(b"HTTP/1.1 200 ")
    async with httpx.AsyncClient(base_url=deployment.control_url, trust_env=False) as client:
        assert (await client.get("/ready")).status_code == 200


async def _receive_within(stream: trio.SocketStream, seconds: float) -> bytes:
    with trio.move_on_after(seconds):
        return await stream.receive_some(65536)
    return b""


async def test_a_client_that_pipelines_and_never_reads_is_dropped(dpsup: Harness) -> None:
    deployment = await dpsup.start(1)
    host, port = deployment.control_url.removeprefix("http://").rsplit(":", 1)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect((host, int(port)))
    client.setblocking(False)
    request = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n" * 64
    closed = False
    with trio.fail_after(60):
        while not closed:  # bounded: the server closes within its idle timeout
            try:
                client.send(request)
            except BlockingIOError:
                await trio.sleep(0.2)  # pacing: the server is not reading either
            except (BrokenPipeError, ConnectionResetError):
                closed = True
    client.close()
    async with httpx.AsyncClient(base_url=deployment.control_url, trust_env=False) as c:
        assert (await c.get("/ready")).status_code == 200


# -- bad input


async def test_a_config_that_is_a_fifo_or_nested_too_deeply_exits_2(tmp_path: Path) -> None:
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    code, _, err = await run_cli(["--config", str(fifo), "--", "true"])
    assert (code, err.strip()) == (
        2, f"trio-dpsup: error: --config {fifo} is not a regular file: give a TOML file",
    )  # fmt: skip
    deep = tmp_path / "deep.toml"
    deep.write_text("ranks = " + "[" * 5000 + "]" * 5000 + "\n")
    code, _, err = await run_cli(["--config", str(deep), "--", "true"])
    assert (code, err.strip()) == (
        2, f"trio-dpsup: error: --config {deep}: nested too deeply to be a config",
    )  # fmt: skip
