"""The pytest plugin of the failure-injection harness. Opt in from a conftest.py or a test
module (it is not loaded by itself)::

    pytest_plugins = ["trio_dpsup.testing.plugin"]

It needs pytest-trio, with ``trio_mode = true`` or ``@pytest.mark.trio`` on the tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ._harness import Harness, open_harness

__all__ = ["dpsup"]


@pytest.fixture
async def dpsup() -> AsyncIterator[Harness]:
    """A `Harness` whose supervisors run inside the test's Trio run.

    At teardown every supervisor still running gets SIGTERM (then the kill, after its grace
    period), and the test errors with `LeftoverProcesses` if any process of any tree it
    started outlived its supervisor.
    """
    async with open_harness() as harness:
        yield harness
