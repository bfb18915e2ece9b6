"""Failure-injection tests for a deployment: copy this file into your project's tests."""

import signal
import sys

import pytest
import trio

from trio_dpsup import RankExited
from trio_dpsup.testing import Form, Harness

pytest_plugins = ["trio_dpsup.testing.plugin"]
pytestmark = pytest.mark.trio  # not needed where pytest-trio's trio_mode is on


async def test_a_crashed_rank_takes_the_deployment_down(dpsup: Harness) -> None:
    # Four fake ranks under the real CLI, as Kubernetes would run it.
    deployment = await dpsup.start(4, form=Form.CLI, grace_period=5)
    assert await deployment.ready_code() == 200
    await deployment.crash_rank(2, -signal.SIGKILL)
    with trio.fail_after(10):  # waits are bounded by their caller, as any Trio call
        assert await deployment.wait_exit() == 137  # the crashed rank's status, not 0
    failure = await deployment.failure()  # typed in both forms, as the library raises it
    assert isinstance(failure, RankExited)
    assert (failure.rank, failure.returncode) == (2, -signal.SIGKILL)
    await deployment.assert_no_leftovers()  # also checked for you at teardown


async def test_my_server_stops_within_its_grace_period(dpsup: Harness) -> None:
    # Your own server here; {port} (and {rank}, {gpus}...) are filled in per rank.
    command = [sys.executable, "-m", "trio_dpsup.demo", "--port", "{port}"]
    deployment = await dpsup.start(2, command=command, grace_period=10)
    deployment.signal_supervisor(signal.SIGTERM)
    assert await deployment.wait_exit() == 0  # 1: a rank had to be killed at the deadline
