"""systemd's notify protocol (Type=notify): READY=1, STOPPING=1 and watchdog pings.

With ``Type=notify`` systemd passes NOTIFY_SOCKET, a unix datagram socket (a leading ``@``
names one in the abstract namespace). We send READY=1 once every rank is ready, STOPPING=1
when shutdown begins, and, when the unit has ``WatchdogSec=`` (WATCHDOG_USEC, for our pid
if WATCHDOG_PID is set), WATCHDOG=1 at half that interval from the event loop: a stuck loop
stops the pings and systemd restarts us. Without NOTIFY_SOCKET this does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

from ._errors import SupervisorStopped
from ._supervisor import SupervisorHandle

__all__ = ["Notifier", "run_systemd_notify"]

logger = logging.getLogger(__name__)


class Notifier:
    """Sends notify messages to the socket named by NOTIFY_SOCKET in `environ`."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        self.watchdog: float | None = None
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (pid is None or pid == str(os.getpid())):
            self.watchdog = int(usec) / 1_000_000

    async def send(self, message: str) -> None:
        if self.address is None:
            return
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                await sock.sendto(message.encode(), self.address)
            except OSError as exc:  # systemd gone, or a bad NOTIFY_SOCKET: not fatal
                logger.warning("systemd notify to %r failed: %s", self.address, exc)


async def run_systemd_notify(handle: SupervisorHandle, environ: Mapping[str, str]) -> None:
    """Notify systemd of readiness, shutdown and liveness until cancelled.

    **Cancellation**: prompt; nothing to clean up.
    """
    notifier = Notifier(environ)
    if notifier.address is None:
        return
    async with trio.open_nursery() as nursery:
        if notifier.watchdog is not None:
            nursery.start_soon(_watchdog, notifier, notifier.watchdog)
        nursery.start_soon(_ready, notifier, handle)
        await handle.wait_stopping()
        await notifier.send("STOPPING=1\nSTATUS=stopping")
        # The watchdog goes on pinging through the shutdown, until we are cancelled.


async def _ready(notifier: Notifier, handle: SupervisorHandle) -> None:
    try:
        await handle.wait_ready()
    except SupervisorStopped:
        return  # stopping before ready: STOPPING=1 says it all
    await notifier.send("READY=1\nSTATUS=every rank is ready")


async def _watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        await notifier.send("WATCHDOG=1")
        await trio.sleep(interval / 2)  # the protocol's pacing: ping at half the timeout
