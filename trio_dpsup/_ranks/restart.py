"""Restart policies: which rank failures restart the rank (or every rank) instead of
stopping everything, how often, and how long to wait first.

Like an OTP supervisor: more than `max_restarts` restarts within `restart_window` seconds
(counted over all ranks) escalate to the normal fail-everything teardown, with that as the
cause. Between restarts of one rank, the wait doubles from `restart_backoff_min` up to
`restart_backoff_max`, with jitter, so that ranks that crash together do not come back in
lockstep.
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Iterable

import trio

from .._config.enums import RestartPolicy, RestartScope
from .._errors import (
    GenerationFailed,
    RankExited,
    RankStalled,
    RankStartTimeout,
    RankUnhealthy,
    RestartsExhausted,
    StartupStalled,
    SupervisorFailure,
)

__all__ = ["Restarter"]

logger = logging.getLogger(__name__)


class Restarter:
    """Decides, for each rank failure, between a restart and escalation."""

    def __init__(
        self,
        policy: RestartPolicy,
        scope: RestartScope,
        *,
        max_restarts: int,
        window: float,
        backoff_min: float,
        backoff_max: float,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self.scope = scope
        self._max = max_restarts
        self._window = window
        self._backoff = (backoff_min, backoff_max)
        self._rng = rng or random.Random()
        self._recent: collections.deque[float] = collections.deque()

    def restartable(self, failure: SupervisorFailure) -> bool:
        """A failure of the rank's own process; not one of its GPU, or of starting it at all
        (a restart cannot mend those)."""
        if self.policy is RestartPolicy.NEVER:
            return False
        return isinstance(
            failure,
            RankExited
            | RankUnhealthy
            | RankStartTimeout
            | RankStalled
            | GenerationFailed
            | StartupStalled,
        )

    def decide(self, failure: SupervisorFailure) -> SupervisorFailure | None:
        """None: restart. Otherwise the failure to stop everything with: `failure` itself,
        or `RestartsExhausted` when the restart intensity is exceeded."""
        if not self.restartable(failure):
            return failure
        now = trio.current_time()
        while self._recent and now - self._recent[0] > self._window:
            self._recent.popleft()
        if len(self._recent) >= self._max:
            return RestartsExhausted(failure, self._max, self._window)
        self._recent.append(now)
        return None

    def recent(self, times: Iterable[float]) -> int:
        """How many of `times` (restarts of one rank) fall within the restart window."""
        now = trio.current_time()
        return sum(1 for t in times if now - t <= self._window)

    def backoff(self, recent_restarts: int) -> float:
        """Seconds to wait before the `recent_restarts`-th restart of one rank (from 1)."""
        low, high = self._backoff
        # Between half the ceiling and the ceiling, which doubles per recent restart: jitter,
        # so that ranks do not restart in step, and never below --restart-backoff-min (the
        # first restart waits between the minimum and twice it).
        ceiling = min(high, low * 2 ** max(1, recent_restarts))
        return self._rng.uniform(max(low, ceiling / 2), ceiling)
