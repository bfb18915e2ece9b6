"""The truest cause: a rank whose probes fail because it is on its way out (its listener
closed, its process not yet reaped) is reported as what it is, an exit with its own status,
and that status is the supervisor's; a rank that stays alive and unhealthy is failed as
unhealthy, no more than `VERDICT_WINDOW` later, out of traffic meanwhile."""

from __future__ import annotations

import signal
import sys

import pytest
import trio

from trio_dpsup import RankExited, RankUnhealthy
from trio_dpsup._ranks.rank import VERDICT_WINDOW  # the window's length, on purpose
from trio_dpsup.testing import Form, Harness

pytest_plugins = ["trio_dpsup.testing.plugin"]

#: A rank that serves /health until SIGUSR1, then closes its listener, takes `TEARDOWN`
#: seconds (an engine freeing its GPU memory), and exits 3.
TEARDOWN = 0.3
CLOSES_THEN_EXITS = f"""
import http.server, os, signal, sys, threading, time
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Health)
threading.Thread(target=server.serve_forever, daemon=True).start()
signal.sigwait([signal.SIGUSR1])
server.shutdown()
server.server_close()
time.sleep({TEARDOWN})
os._exit(3)
"""


@pytest.mark.parametrize("run", range(20))
async def test_an_exit_after_failed_probes_is_the_cause(dpsup: Harness, run: int) -> None:
    deployment = await dpsup.start(
        1, command=[sys.executable, "-c", CLOSES_THEN_EXITS, "{port}"], form=Form.LIBRARY
    )
    await deployment.signal_rank(0, signal.SIGUSR1)
    # Out of service at once: before its exit is seen, and well before the verdict.
    status = await deployment.wait_for_status(
        lambda s: s.ranks[0].failing or s.failure is not None, "rank 0 failing"
    )
    assert not status.takes_traffic(status.ranks[0])
    assert await deployment.wait_exit() == 3
    failure = await deployment.failure()
    assert isinstance(failure, RankExited), failure
    assert str(failure) == "rank 0 exited unexpectedly: exit status 3"


async def test_a_rank_alive_and_unhealthy_is_failed_within_the_window(dpsup: Harness) -> None:
    deployment = await dpsup.start(1, form=Form.LIBRARY)
    await deployment.fail_health(0)
    failing = await deployment.wait_for_status(lambda s: s.ranks[0].failing, "rank 0 failing")
    seen = trio.current_time()
    assert not failing.takes_traffic(failing.ranks[0])
    assert not failing.ready  # /ready: 503 from the first confirmed failure
    assert await deployment.wait_exit() == 1
    waited = trio.current_time() - seen
    assert isinstance(await deployment.failure(), RankUnhealthy)
    # The verdict waited the window for an exit that did not come, and not much longer
    # (the upper bound is loose: the rank's stop comes after it, on a shared machine).
    assert VERDICT_WINDOW * 0.9 <= waited <= VERDICT_WINDOW + 5.0
