"""The operator's actions on a running supervisor, as the admin socket (admin_socket.py)
receives them, typed by protocol.py; the client is ``trio-dpsup ctl`` (ctl.py).

Actions: ``status``; ``restart`` a rank (the stop procedure, then a start, no backoff;
``wait`` for it to be ready again); ``drain`` / ``undrain`` a rank (it keeps running; /ranks
and /ranks/{r}/ready say not ready); ``pause-probes`` of a rank for some seconds (a weight
reload) and ``resume-probes``; ``rolling-restart`` (every rank, at most ``max_unavailable``
out at a time). Every action is logged and counted in /metrics.

The semantics are a PodDisruptionBudget's: an action that takes a serving rank out
(restart, drain) is refused, with the numbers, when fewer than ``--min-ready`` ranks would
be left serving, unless the request says ``force``; /ready then tells the truth (503). One
operation at a time: while a rolling restart or a waited restart runs, every other change
gets a clear "busy" answer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .._config.concerns import AdminSettings
from .._errors import RestartRequested
from .._state.board import Board, RankRecord
from .._state.document import status_to_json
from .._state.status import DrainReason, RankState
from .protocol import PROGRESS_EVERY, Action, Reply, Request, Skipped

__all__ = ["Admin", "AdminError"]

logger = logging.getLogger("trio_dpsup.admin")

#: Without a rank timeout in the request: how long a restarted rank may take to return.
DEFAULT_RANK_TIMEOUT = 1800.0


def _nowhere(text: str) -> None:
    pass


class AdminError(Exception):
    """A request that cannot be carried out; its message goes back to the client."""


@dataclass(frozen=True)
class _Taken:
    """A rank an operation took out for a restart, and the moments it has reached since
    (trio.current_time()): ready again, then listed by every router."""

    record: RankRecord
    before: int  # its restarts before
    began: float
    deadline: float  # --rank-timeout: not ready again by then, it is late
    ready_at: float | None = None
    listed_at: float | None = None


@dataclass(frozen=True)
class _Back:
    """Ready again, and back in every balancer."""

    rank: int
    seconds: float


@dataclass(frozen=True)
class _CrashLooping:
    """Failed again after its restart: a rolling restart skips it rather than stops."""

    rank: int
    why: str


@dataclass(frozen=True)
class _Late:
    """Not ready again within --rank-timeout: the operation stops."""

    rank: int
    why: str


_Outcome = _Back | _CrashLooping | _Late


class Admin:
    """Carries out the operator's actions on one supervisor run."""

    def __init__(
        self,
        config: AdminSettings,
        board: Board,
        count: Callable[[Action], None],
    ) -> None:
        self._config = config
        self._board = board
        self._count = count
        #: The long operation in progress (for "busy" answers and `status`), if any.
        self._operation: str | None = None
        #: Where the long operation's progress lines go (its client), while it runs, and
        #: when it last said something (see `_say`).
        self._progress: Callable[[str], None] = _nowhere
        self._last_word = 0.0

    async def act(self, request: Request, progress: Callable[[str], None] = _nowhere) -> Reply:
        """The answer to one request; raises AdminError when it is refused. A long action
        says how it goes through `progress`, at each step and at least every
        PROGRESS_EVERY seconds while it waits.

        **Cancellation**: a drain, a rolling restart or a waited restart in progress stops
        waiting; what it began goes on in the ranks' own tasks.
        """
        return await self._act(request, progress)

    async def _act(self, request: Request, progress: Callable[[str], None]) -> Reply:
        action = request.action
        if action is Action.STATUS:
            status = status_to_json(self._board.snapshot())
            return Reply(status=status, operation=self._operation)
        handlers = {
            Action.RESTART: self._restart,
            Action.DRAIN: self._drain,
            Action.UNDRAIN: self._undrain,
            Action.PAUSE_PROBES: self._pause,
            Action.RESUME_PROBES: self._resume,
            Action.ROLLING_RESTART: self._rolling_restart,
        }
        if self._board.stopping.is_set():
            raise AdminError("the supervisor is stopping")
        if self._config.forms_group and action.takes_ranks_out:
            raise AdminError(
                f"{action.value} of one rank: {self._config.group_reason}, which cannot "
                "take back "
                "one restarted or drained rank: restart the whole supervisor instead (systemctl "
                "restart, or delete the pod)"
            )
        if self._operation is not None:
            raise AdminError(
                f"busy: {self._operation} is in progress; try again when it ends "
                "(trio-dpsup ctl status shows it)"
            )
        # Only the request that runs gets the progress lines: one refused as busy must not
        # take them from the operation it was refused for.
        self._progress, self._last_word = progress, trio.current_time()
        try:
            reply = await handlers[action](request)
        finally:
            self._progress = _nowhere
        self._count(action)
        return reply

    # -- the actions

    async def _restart(self, request: Request) -> Reply:
        record = self._record(request)
        timeout = self._rank_timeout(request)
        self._within_budget(record, "restarting", request.force)
        taken = self._take_out(record, timeout)
        if request.wait:
            rank = record.plan.rank
            self._operation = f"a restart of rank {rank}"
            try:
                # Back for the balancers too: a pull-based one needs --drain-delay to see
                # it, and the operator's next step may take another rank out.
                outcome = await self._next_outcome({rank: taken})
            finally:
                self._operation = None
            if not isinstance(outcome, _Back):
                raise AdminError(outcome.why)
            self._say(f"rank {rank} ready again after {outcome.seconds:.2f}s")
        return Reply(rank=record.plan.rank)

    async def _drain(self, request: Request) -> Reply:
        """Take the rank out; when it was serving, wait for its drain (the routers, the
        delay, its requests in flight), saying how it ended."""
        record = self._record(request)
        self._within_budget(record, "draining", request.force)
        reply = self._set_drained(record, True)
        if record.drain is None:
            return reply  # it was not serving: nothing to wait for
        rank = record.plan.rank
        config = self._config
        bound = config.router_timeout + config.drain_delay + config.drain_timeout + 10.0
        self._operation = f"a drain of rank {rank}"
        try:
            await self._until(lambda: record.drain is None or record.drain.end is not None, bound)
        finally:
            self._operation = None
        drain = record.drain
        if drain is not None and drain.end is not None and drain.seconds is not None:
            self._say(f"rank {rank} drained in {drain.seconds:.2f}s: {drain.end.value}")
        return reply

    async def _undrain(self, request: Request) -> Reply:
        record = self._record(request)
        drain = record.drain
        if drain is not None and drain.reason is not DrainReason.DRAIN:
            raise AdminError(
                f"rank {record.plan.rank} is being drained for a {drain.reason.value}: it "
                "comes back by itself once restarted"
            )
        return self._set_drained(record, False)

    async def _pause(self, request: Request) -> Reply:
        record = self._record(request)
        seconds = request.seconds
        assert seconds is not None  # Request.from_json checked it
        record.pause_probes(seconds)
        rank = record.plan.rank
        logger.info("rank %d: probes paused for %gs", rank, seconds, extra={"rank": rank})
        return Reply(rank=rank, seconds=seconds)

    async def _resume(self, request: Request) -> Reply:
        record = self._record(request)
        record.resume_probes()
        rank = record.plan.rank
        logger.info("rank %d: probes resumed", rank, extra={"rank": rank})
        return Reply(rank=rank)

    async def _rolling_restart(self, request: Request) -> Reply:
        """Restart every rank, at most `max_unavailable` out at a time (ranks already out
        count), each restarted one awaited until it is ready again and back in every
        balancer. A rank that is not ready when its turn comes, or fails again after its
        restart (crash-looping), is skipped and reported; one that does not return within
        the rank timeout ends the roll.

        A plain loop: each turn waits for room, settling the outcomes of the ranks it has
        out (`_next_outcome`) as they come."""
        board = self._board
        total = len(board.ranks)
        limit = self._max_unavailable(request)
        timeout = self._rank_timeout(request)
        drained = [r.plan.rank for r in board.ranks if r.drained]
        if len(drained) >= limit:
            raise AdminError(
                f"a rolling restart has no room: drained rank(s) {_ranks(drained)} already "
                f"count against --max-unavailable {limit} (they serve nothing): undrain "
                f"them, or pass --max-unavailable {len(drained) + 1} (/ready answers 503 "
                "below --min-ready)"
            )
        restarted: list[int] = []
        skipped: list[Skipped] = []
        excluded: set[int] = set()  # skipped as unstable: no longer counted as out
        taken: dict[int, _Taken] = {}  # out for this roll, until back in every balancer

        def out() -> int:
            return self._out(taken, excluded)

        try:
            for record in board.ranks:
                rank = record.plan.rank
                if record.drained:
                    skipped.append(Skipped(rank, "it is drained: left drained"))
                    continue
                self._operation = (
                    f"a rolling restart (rank {rank} next; {len(restarted)} of {total} done)"
                )
                while taken and out() >= limit:  # room comes as the roll's ranks settle
                    self._settle(await self._next_outcome(taken), taken, skipped, excluded)
                if out() >= limit and not await self._until(lambda: out() < limit, timeout):
                    raise AdminError(
                        f"no room to take rank {rank} out within {timeout:g}s "
                        f"(--rank-timeout): {out()} rank(s) out, at most {limit}"
                    )
                unstable = self._unstable(record)
                if unstable is not None:
                    skipped.append(Skipped(rank, unstable))
                    excluded.add(rank)
                    continue
                taken[rank] = self._take_out(record, timeout)
                restarted.append(rank)
                self._progress(
                    f"rank {rank}: draining and restarting ({len(restarted)} of {total})"
                )
            while taken:
                self._settle(await self._next_outcome(taken), taken, skipped, excluded)
        except AdminError as exc:  # one late, or the supervisor began stopping
            raise AdminError(
                f"{exc}: the rolling restart stopped; restarted: {_ranks(restarted)}; "
                f"skipped: {_ranks([s.rank for s in skipped])}"
            ) from None
        finally:
            self._operation = None
        return Reply(ranks=tuple(restarted), skipped=tuple(skipped), max_unavailable=limit)

    def _settle(
        self,
        outcome: _Outcome,
        taken: dict[int, _Taken],
        skipped: list[Skipped],
        excluded: set[int],
    ) -> None:
        """A rolling restart's rank settled: back (said), crash-looping (skipped, and no
        longer counted as out) or late (AdminError: the roll stops)."""
        del taken[outcome.rank]
        if isinstance(outcome, _Late):
            raise AdminError(outcome.why)
        if isinstance(outcome, _CrashLooping):
            skipped.append(Skipped(outcome.rank, outcome.why))
            excluded.add(outcome.rank)
            return
        self._say(f"rank {outcome.rank} ready again")

    def _out(self, taken: dict[int, _Taken], excluded: set[int]) -> int:
        """Ranks out now: not serving (a drained one serves nothing: it counts), or taken
        out by the roll and not back in yet; not those it skipped as unstable."""
        out = {r.plan.rank for r in self._board.ranks if not r.serving} - excluded
        return len(out | taken.keys())

    # -- the pieces

    def _record(self, request: Request) -> RankRecord:
        rank = request.rank
        record = None if rank is None else self._board.by_rank(rank)
        if record is None:
            ranks = f"{self._board.ranks[0].plan.rank}-{self._board.ranks[-1].plan.rank}"
            raise AdminError(f"no rank {rank!r} here: the ranks are {ranks}")
        return record

    def _serving(self) -> int:
        return self._board.snapshot().serving()  # the one definition /ready uses

    def _within_budget(self, record: RankRecord, doing: str, force: bool) -> None:
        """Refuse to take a serving rank out below --min-ready, as a PodDisruptionBudget
        refuses an eviction, unless `force`."""
        if force or not record.serving:
            return  # it serves no traffic now: taking it out changes nothing
        left, needed, total = self._serving() - 1, self._board.min_ready, len(self._board.ranks)
        if left >= needed:
            return
        lower = f", or run the supervisor with --min-ready {left}" if left >= 1 else ""
        raise AdminError(
            f"{doing} rank {record.plan.rank} would leave {left} of {total} ranks serving, "
            f"below --min-ready {needed}: pass --force (/ready answers 503 until enough are "
            f"back){lower}"
        )

    def _max_unavailable(self, request: Request) -> int:
        value = request.max_unavailable
        total, needed = len(self._board.ranks), self._board.min_ready
        if value is None:
            if total - needed >= 1:
                return total - needed
            raise AdminError(
                f"a rolling restart takes ranks out, and --min-ready {needed} leaves no room "
                f"among {total} ranks: pass --max-unavailable 1 (/ready answers 503 while a "
                f"rank is out), or run the supervisor with --min-ready {max(total - 1, 1)}"
            )
        if not 1 <= value <= total:
            raise AdminError(f"--max-unavailable must be within 1-{total}, not {value!r}")
        return value

    def _rank_timeout(self, request: Request) -> float:
        if request.rank_timeout is None:
            return self._config.startup_timeout or DEFAULT_RANK_TIMEOUT
        return request.rank_timeout

    def _unstable(self, record: RankRecord) -> str | None:
        """Why a rolling restart should leave `record` alone (crash-looping), or None: it
        is not ready, or it restarted on its own within --restart-window."""
        if record.state is not RankState.READY:
            return f"it was {record.state.value}"
        window = self._config.restart_window
        if (
            record.restart_times
            and record.restart_times[-1] > trio.current_time() - window
            and record.last_causes
            and not isinstance(record.last_causes[-1], RestartRequested)
        ):
            return f"it restarted on its own within {window:g}s: {record.last_causes[-1]}"
        return None

    def _restart_one(self, record: RankRecord) -> None:
        """Ask the rank's task to drain it, stop it and start it again (no backoff)."""
        rank = record.plan.rank
        if record.state is not RankState.READY:
            raise AdminError(f"rank {rank} is {record.state.value}: restart a ready rank")
        if record.drain is not None and record.drain.reason is not DrainReason.DRAIN:
            raise AdminError(
                f"rank {rank} is already being drained for a {record.drain.reason.value}"
            )
        logger.info("rank %d: restart requested", rank, extra={"rank": rank})
        record.request_restart(RestartRequested(rank), drain=True)

    def _set_drained(self, record: RankRecord, drained: bool) -> Reply:
        record.set_drained(drained)  # a ready rank's task waits for what is in flight
        rank = record.plan.rank
        logger.info("rank %d %s", rank, "drained" if drained else "undrained", extra={"rank": rank})
        return Reply(rank=rank)

    def _take_out(self, record: RankRecord, timeout: float) -> _Taken:
        """Restart `record` (`_restart_one`): it is out until `_next_outcome` says."""
        before = record.restarts
        self._restart_one(record)
        return _Taken(record, before, trio.current_time(), trio.current_time() + timeout)

    async def _next_outcome(self, taken: dict[int, _Taken]) -> _Outcome:
        """Wait for the first of the `taken` ranks to settle: back (ready again, listed by
        every router that answers, at most --router-timeout, and then --drain-delay for
        pull-based balancers), failed again, or late. Raises AdminError if the supervisor
        begins stopping. Updates `taken` as they move (ready, listed)."""
        while True:  # each change of the board or a deadline wakes it
            if self._board.stopping.is_set():
                raise AdminError("the supervisor began stopping")
            now = trio.current_time()
            for rank, one in taken.items():
                taken[rank] = one = self._advance(one, now)
                outcome = self._outcome_of(one, now)
                if outcome is not None:
                    return outcome
            wake = min((self._wake_at(one) for one in taken.values()), default=math.inf)
            # At least every PROGRESS_EVERY seconds a word, however often the board
            # changes meanwhile (a failing router's retries, a crash-looping rank).
            with trio.move_on_at(min(wake, self._last_word + PROGRESS_EVERY)):
                await self._board.changed.wait()
            if trio.current_time() >= self._last_word + PROGRESS_EVERY:
                self._say(f"still going: {self._operation or 'waiting'}")

    def _advance(self, one: _Taken, now: float) -> _Taken:
        """`one` with the moments it reached: ready again, then in every router."""
        record = one.record
        if one.ready_at is None and self._back(one) and record.state is RankState.READY:
            one = dataclasses.replace(one, ready_at=now)
        if one.ready_at is not None and one.listed_at is None:
            rank = record.plan.rank
            routers = [r for r in self._board.routers.values() if r.problem is None]
            if all(rank in r.listed for r in routers) or (
                now >= one.ready_at + self._config.router_timeout
            ):
                one = dataclasses.replace(one, listed_at=now)
        return one

    def _outcome_of(self, one: _Taken, now: float) -> _Outcome | None:
        record = one.record
        rank = record.plan.rank
        if record.restarts > one.before + 1:
            cause = record.last_causes[-1] if record.last_causes else "?"
            return _CrashLooping(
                rank, f"rank {rank} failed again after its restart (crash-looping?): {cause}"
            )
        if one.listed_at is not None and now >= one.listed_at + self._config.drain_delay:
            return _Back(rank, now - one.began)
        if one.ready_at is None and now >= one.deadline:
            return _Late(
                rank,
                f"rank {rank} did not return within {one.deadline - one.began:g}s "
                f"(--rank-timeout): it is {record.state.value}",
            )
        return None

    def _back(self, one: _Taken) -> bool:
        return one.record.restarts > one.before

    def _wake_at(self, one: _Taken) -> float:
        """When `one` may settle without a change of the board: its deadline, or the end of
        its wait for the routers or of its --drain-delay."""
        if one.ready_at is None:
            return one.deadline
        if one.listed_at is None:
            return one.ready_at + self._config.router_timeout
        return one.listed_at + self._config.drain_delay

    def _say(self, text: str) -> None:
        """A progress line of the action in progress."""
        self._last_word = trio.current_time()
        self._progress(text)

    async def _until(self, condition: Callable[[], bool], timeout: float) -> bool:  # noqa: ASYNC109
        """Whether `condition` came to hold within `timeout` seconds, re-checked at each
        change of the board. Raises AdminError if the supervisor begins stopping."""
        with trio.move_on_after(timeout):
            while not condition():  # each change of the board wakes it
                if self._board.stopping.is_set():
                    raise AdminError("the supervisor began stopping")
                # At least every PROGRESS_EVERY seconds a word, however often the board
                # changes meanwhile (a failing router's retries, a crash-looping rank).
                with trio.move_on_at(self._last_word + PROGRESS_EVERY):
                    await self._board.changed.wait()
                if trio.current_time() >= self._last_word + PROGRESS_EVERY:
                    self._say(f"still going: {self._operation or 'waiting'}")
            return True
        return False


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks)) or "none"
