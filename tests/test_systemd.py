"""Type=notify: the CLI tells a real unix datagram socket READY=1, STOPPING=1 and WATCHDOG=1."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import tomllib
import uuid
from pathlib import Path

import pytest
import trio

from trio_dpsup.testing import free_port_range, open_cli_supervisor

from .conftest import cli_args


class NotifySocket:
    """What systemd would be: a datagram socket, and every message it got."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.messages: list[str] = []
        self._changed = trio.Event()

    async def receive(self) -> None:
        while True:
            data = await self.sock.recv(4096)
            self.messages.append(data.decode())
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, line: str, count: int = 1) -> None:
        with trio.fail_after(30):
            while sum(line in m.splitlines() for m in self.messages) < count:
                await self._changed.wait()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
async def test_ready_watchdog_and_stopping(tmp_path: Path, abstract: bool) -> None:
    if abstract:
        name = f"@trio-dpsup-test-{uuid.uuid4().hex}"
        address = "\0" + name[1:]
    else:
        name = address = str(tmp_path / "notify")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(address)
        notify = NotifySocket(sock)
        env = {**os.environ, "NOTIFY_SOCKET": name, "WATCHDOG_USEC": "200000"}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notify.receive)
            base = free_port_range(2)
            async with open_cli_supervisor(cli_args(2, base), env=env) as sup:
                await sup.wait_ready()
                await notify.wait_for("READY=1")
                await notify.wait_for("WATCHDOG=1", count=3)  # every 100 ms
                assert not any("STOPPING=1" in m for m in notify.messages)
                sup.send_signal(signal.SIGTERM)
                assert await sup.wait() == 0
            await notify.wait_for("STOPPING=1")
            ready = next(i for i, m in enumerate(notify.messages) if "READY=1" in m)
            stopping = next(i for i, m in enumerate(notify.messages) if "STOPPING=1" in m)
            assert ready < stopping
            nursery.cancel_scope.cancel()


async def test_watchdog_for_another_pid_is_not_ours(tmp_path: Path) -> None:
    address = str(tmp_path / "notify")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(address)
        notify = NotifySocket(sock)
        env = {
            **os.environ,
            "NOTIFY_SOCKET": address,
            "WATCHDOG_USEC": "100000",
            "WATCHDOG_PID": "1",  # systemd meant another process
        }
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notify.receive)
            async with open_cli_supervisor(cli_args(1, free_port_range(1)), env=env) as sup:
                await sup.wait_ready()
                await notify.wait_for("READY=1")
                sup.send_signal(signal.SIGTERM)
                assert await sup.wait() == 0
            await notify.wait_for("STOPPING=1")
            assert not any("WATCHDOG=1" in m for m in notify.messages)
            nursery.cancel_scope.cancel()


UNIT = Path(__file__).parent.parent / "deploy" / "systemd" / "trio-dpsup.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_restarts_sensibly_and_is_hardened() -> None:
    settings = unit_settings()
    node = tomllib.loads((UNIT.parent / "node.toml").read_text())
    assert settings["RestartPreventExitStatus"] == ["2"]
    assert int(settings["TimeoutStartSec"][0]) > node["startup-timeout"]
    stop = node["grace-period"] + node["drain-delay"] + node["drain-timeout"]
    assert int(settings["TimeoutStopSec"][0]) > stop
    for key, value in (
        ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("User", "trio-dpsup"),
    ):  # fmt: skip
        assert settings[key] == [value]
    (path,) = [v for v in settings["Environment"] if v.startswith("PATH=")]
    assert path.startswith("PATH=/opt/trio-dpsup/.venv/bin:")  # where vllm is found
    assert settings["ExecStart"][0].startswith("/")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
async def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # The unit names a user and paths of a real install: make a copy that points at what
    # exists here, so that verify judges the unit's settings, not this machine's users.
    text = UNIT.read_text()
    for old, new in (
        ("/opt/trio-dpsup/.venv/bin/trio-dpsup", shutil.which("true") or "/bin/true"),
        ("User=trio-dpsup", "User=root"),
        ("Group=trio-dpsup", "Group=root"),
    ):
        text = text.replace(old, new)
    copy = tmp_path / "trio-dpsup.service"
    copy.write_text(text)
    with trio.fail_after(60):
        result = await trio.run_process(
            ["systemd-analyze", "verify", str(copy)],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
    output = (result.stdout + result.stderr).decode()
    problems = [
        line for line in output.splitlines()
        if ("trio-dpsup.service" in line and "Failed to" not in line) or "Unknown key" in line
    ]  # fmt: skip
    assert not problems, output


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
async def test_systemd_analyze_rates_the_unit_ok(tmp_path: Path) -> None:
    # systemd-analyze security --offline reads the unit file as it is; 4.0 or lower is
    # "OK" on its scale (the unit once rated 7.9, "EXPOSED"). The GPUs stay reachable.
    settings = unit_settings()
    assert settings["DevicePolicy"] == ["closed"]
    assert "char-nvidia-frontend rw" in settings["DeviceAllow"]
    assert "char-nvidia-uvm rw" in settings["DeviceAllow"]
    copy = tmp_path / "trio-dpsup.service"
    copy.write_text(UNIT.read_text())
    with trio.fail_after(60):
        result = await trio.run_process(
            ["systemd-analyze", "security", "--offline=true", str(copy)],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
    output = (result.stdout + result.stderr).decode()
    found = re.search(r"Overall exposure level for trio-dpsup\.service: (\d+\.\d)", output)
    if found is None and "offline" in output.lower():
        pytest.skip("this systemd-analyze has no --offline (systemd 250 or later has)")
    assert found is not None, output
    assert float(found.group(1)) <= 4.0, output
