"""Type=notify: the CLI tells a real unix datagram socket READY=1, STOPPING=1 and WATCHDOG=1."""

from __future__ import annotations

import os
import signal
import socket
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
