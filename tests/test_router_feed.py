"""A router that misbehaves never stops the supervisor and never changes /ready: one that is
down, one that accepts and never answers, one that answers garbage. (The real router is in
test_router.py; these are the faults it will not produce on demand.)"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from trio_dpsup import SupervisorState
from trio_dpsup.testing import Harness, free_port_range

pytest_plugins = ["trio_dpsup.testing.plugin"]


@pytest.fixture(params=["down", "silent", "garbage"])
async def bad_router(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A router's address where nothing listens, or a server that accepts and says nothing,
    or one that answers every request with 200 and a body that is not JSON."""
    if request.param == "down":
        yield f"http://127.0.0.1:{free_port_range(1)}"
        return
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            if request.param == "silent":
                await trio.sleep_forever()  # the connection stays open, unanswered
            body = b"<html>not a router</html>"
            head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            await stream.send_all(head + body)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve, listeners)
        yield f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def test_a_router_that_misbehaves_is_retried_and_stops_nothing(
    dpsup: Harness, bad_router: str
) -> None:
    deployment = await dpsup.start(2, routers=(f"sglang={bad_router}",), router_timeout=0.3)
    status = await deployment.wait_for_status(
        lambda s: s.routers[0].errors >= 3, "three failed exchanges with the router"
    )
    (router,) = status.routers
    assert router.name == f"sglang={bad_router}"
    assert router.problem is not None
    assert router.listed == ()
    assert status.state is SupervisorState.READY
    assert await deployment.ready_code() == 200
    assert deployment.returncode is None
    # Its stop is not held up by the router either.
    deployment.signal_supervisor(15)
    with trio.fail_after(10):
        assert await deployment.wait_exit() == 0
