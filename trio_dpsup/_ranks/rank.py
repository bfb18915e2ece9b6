"""The task that owns one rank: spawn its process, watch it (exit and health probes), stop
it, and, where the restart policy says so, start it again.

An exit that nobody asked for is a failure (`RankExited`), also with status 0; so are failed
probes (`RankUnhealthy`). The `Restarter` decides between a restart and stopping everything;
stopping everything is decided first, so that /ready answers 503 and every other rank is
signalled in the same tick, and only then is this rank's own tree stopped. Cancellation of
the task is the request to stop: it runs the stop procedure, shielded and bounded by the
grace deadline.
"""

from __future__ import annotations

import logging
import subprocess

import trio

from .._config.enums import RestartScope
from .._errors import (
    RankExited,
    RankSpawnFailed,
    RestartedWith,
    StartupTimeout,
    SupervisorFailure,
    describe_returncode,
)
from .._output.pump import wait_drained
from .._proc.cookie import TREE_ENV, rank_cookie
from .._proc.spawn import RankProcess
from .._proc.stop import stop_rank
from .._state.board import RankRecord
from .._state.status import DrainReason
from .clean_start import wait_clean_restart
from .context import RankContext
from .drain import drain_rank
from .evidence import EvidenceRequest, capture_evidence, wants_evidence
from .prober import probe_rank
from .progress import LearnedLimit, learned_limit
from .readings import watch_metrics
from .startup import watch_startup

__all__ = ["run_rank"]

logger = logging.getLogger(__name__)

#: How long a failure's verdict waits for the process's own exit (see `_watch`). A process
#: that is exiting has closed its listener before the kernel reaps it: llama-server on an
#: H200, SIGKILLed, failed three probes in 31 ms and freed its GPU memory 0.11 s after the
#: kill. The teardown's length is the engine's, not the probes' (two intervals would be 0.1
#: s under fast probes, 2 s by default), so the window is a fixed time, long enough for a
#: CUDA teardown and short against any probe-based detection: a rank that stays alive and
#: unhealthy is failed this much later, out of traffic meanwhile.
VERDICT_WINDOW = 1.0


async def run_rank(
    record: RankRecord,
    ctx: RankContext,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one rank until everything stops; raise the failure that stopped everything, if it
    was this rank's.

    Calls ``task_status.started()`` once the first process exists.

    **Cancellation**: stops the rank (signal, grace, tree kill) before returning; that part
    is shielded and bounded by the shared grace deadline plus the kill timeout. A cancelled
    backoff wait ends at once: there is no process to stop then.
    """
    first = True
    learned = learned_limit(ctx.settings.progress)  # the rank's, kept across its restarts
    while True:
        if not first:
            await _clean_restart(record, ctx)
        process = await _spawn(record, ctx)
        if first:
            task_status.started()
            first = False
        restart = await _run_process(record, process, ctx, learned)
        if restart is not None:
            raise restart  # stopping everything, with this rank's failure as the cause
        asked = record.restarted()
        delay = ctx.restarter.backoff(ctx.restarter.recent(record.restart_times))
        level = logging.WARNING
        if asked:  # an operator's restart: at once, and no cause for alarm
            delay = 0.0
            level = logging.INFO
        logger.log(
            level,
            "rank %d restarts in %.2fs (restart %d)",
            record.plan.rank,
            delay,
            record.restarts,
            extra={"rank": record.plan.rank},
        )
        await trio.sleep(delay)  # the backoff; a shutdown cancels it


async def _clean_restart(record: RankRecord, ctx: RankContext) -> None:
    """Wait for the previous process's port and GPU memory; a failure stops everything."""
    try:
        settings = ctx.settings.clean_start
        await wait_clean_restart(settings, record, record.previous_tree, ctx.owner, ctx.nvml)
    except SupervisorFailure as failure:
        record.fail()
        raise ctx.fail(failure) from None


async def _spawn(record: RankRecord, ctx: RankContext) -> RankProcess:
    plan = record.plan
    env = {**ctx.environ, **dict(plan.env), TREE_ENV: rank_cookie(ctx.board.run_id, plan.rank)}
    cgroup = None
    if ctx.cgroups is not None:
        cgroup = ctx.cgroups.rank_dir(plan.rank)
        ctx.guardian.cgroup(cgroup)
    try:
        process = await ctx.spawner.spawn(
            plan.argv, env, capture=ctx.pump is not None, cgroup=cgroup
        )
    except (OSError, subprocess.SubprocessError) as exc:
        record.fail()
        raise ctx.fail(RankSpawnFailed(plan.rank, str(exc))) from exc
    root = ctx.scanner.trees.add_root(plan.rank, process.pid)
    if root is not None:
        ctx.guardian.root(root)
    if ctx.pump is not None and process.output is not None:
        ctx.pump.attach(plan.rank, *process.output, record.output)
    record.started(process.pid)
    logger.info(
        "rank %d started: pid %d, port %d",
        plan.rank,
        process.pid,
        plan.port,
        extra={"rank": plan.rank},
    )
    return process


async def _run_process(
    record: RankRecord, process: RankProcess, ctx: RankContext, learned: LearnedLimit | None
) -> SupervisorFailure | None:
    """Watch one process of the rank until it fails, then stop its tree.

    Returns None to restart the rank, or the failure that stops everything (already
    recorded with `ctx.fail`).
    """
    rank = record.plan.rank
    escalate: SupervisorFailure | None = None
    failure: SupervisorFailure | None = None
    try:
        failure = await _watch(record, process, ctx, learned)
        if failure is not None:  # None: a restart asked for (drained first) or a group's
            escalate = _decide(record, failure, ctx)
    finally:
        with trio.CancelScope(shield=True):
            stopping = ctx.board.stopping.is_set()
            record.begin_stop(shutdown=stopping)
            # Evidence first, while the failed process still runs; only this rank waits,
            # and a second signal (kill now) cuts it short: its debuggers are killed.
            captured = False
            with ctx.clock.interruptible():
                captured = await _evidence(record, process, failure, ctx)
            # A restart's stop has a grace period of its own, which a kill ends too; so
            # has a stop that waited for evidence. A shutdown's is shared.
            clock = ctx.clock if stopping and not captured else ctx.clock.for_restart()
            outcome = await stop_rank(rank, process, ctx.scanner, clock)
            if process.output is not None:
                await wait_drained(record.output)  # its last lines, before any report
            killed = stopping and not outcome.graceful
            if record.stopped(outcome.pids, process.returncode, killed):
                how = (
                    "still running"
                    if process.returncode is None
                    else describe_returncode(process.returncode)
                )
                logger.info("rank %d stopped: %s", rank, how, extra={"rank": rank})
    return escalate


async def _evidence(
    record: RankRecord,
    process: RankProcess,
    failure: SupervisorFailure | None,
    ctx: RankContext,
) -> bool:
    """Capture the evidence of this process's failure, or of the supervisor's first failure
    when it names this rank (a GPU fault, the startup deadline), if the process still runs;
    True if it did."""
    rank = record.plan.rank
    if failure is None:
        first = ctx.board.failure
        deadline = isinstance(first, StartupTimeout) and rank in first.not_ready
        if deadline or (first is not None and first.rank == rank):
            failure = first
    if process.returncode is not None or not wants_evidence(ctx.settings.evidence, failure):
        return False
    assert failure is not None
    assert ctx.evidence_dir is not None
    pids = frozenset({proc.pid for proc in await ctx.scanner.scan(rank)} | {process.pid})
    request = EvidenceRequest(ctx.board.run_id, record, failure, pids, tuple(ctx.board.xid_events))
    record.set_evidence(await capture_evidence(ctx.settings.evidence, request, ctx.evidence_dir))
    return True


async def _watch(
    record: RankRecord, process: RankProcess, ctx: RankContext, learned: LearnedLimit | None
) -> SupervisorFailure | None:
    """The first failure of this process (its exit, its failed probes, a stall, failed
    canaries), or None
    once a restart is asked for (an operator's, drained first; a group's, at once). A
    failure during a drain ends the drain: it is a failure, not a planned stop.

    A failure seen while the process runs takes the rank out at once, and its verdict waits
    up to `VERDICT_WINDOW` for the process's own exit: a rank that closed its listener on
    its way out fails its probes before its exit is seen, and its exit status is the truer
    cause (and the supervisor's exit status)."""
    rank = record.plan.rank
    found: list[SupervisorFailure] = []
    # After a restart, the process has a startup deadline of its own; the first start is
    # bounded by the supervisor's startup deadline instead.
    startup = ctx.settings.probes.startup_timeout
    timeout = startup if record.restarts and startup else None

    async def exits(cancel: trio.CancelScope) -> None:
        returncode = await process.wait()
        record.exited(returncode)
        found.append(RankExited(rank, returncode))
        cancel.cancel()

    async def verdict(failure: SupervisorFailure, cancel: trio.CancelScope) -> None:
        found.append(failure)
        record.failing()  # out of traffic and every router now; only the verdict waits
        await trio.sleep(VERDICT_WINDOW)  # an exit meanwhile cancels this (see `exits`)
        cancel.cancel()

    async def probes(cancel: trio.CancelScope) -> None:
        probe = ctx.probes(record.plan.port)
        try:
            await probe_rank(
                ctx.settings.probes,
                ctx.board,
                record,
                probe,
                ctx.ticker,
                observe=ctx.observe,
                startup_timeout=timeout,
            )
        except SupervisorFailure as failure:
            await verdict(failure, cancel)
        finally:
            await probe.aclose()

    async def readings(cancel: trio.CancelScope) -> None:
        try:
            await watch_metrics(
                ctx.settings.progress,
                ctx.settings.canary,
                record,
                ctx.exchanges,
                ctx.readings,
                learned,
                ctx.observe_canary,
            )
        except SupervisorFailure as failure:
            await verdict(failure, cancel)

    async def loading(cancel: trio.CancelScope) -> None:
        async def pids() -> set[int]:
            return {p.pid for p in await ctx.scanner.scan(rank)} | {process.pid}

        try:
            await watch_startup(ctx.settings.probes, record, pids)
        except SupervisorFailure as failure:
            await verdict(failure, cancel)

    async def planned(cancel: trio.CancelScope) -> None:
        while True:  # ends by cancellation, or once drained for a restart
            reason = await record.next_drain_request()
            end = await drain_rank(record, ctx, reason)
            # Restarted only if the drain was not withdrawn and no shutdown began meanwhile
            # (the shutdown stops every rank itself: a restart now would start one again).
            if (
                reason is DrainReason.RESTART
                and end is not None
                and not ctx.board.stopping.is_set()
            ):
                cancel.cancel()
                return
            # An operator's drain: it stays out, running. The shutdown's: the supervisor
            # stops every rank once every drain has ended.

    async def cut(cancel: trio.CancelScope) -> None:
        await record.until_cut()  # the group restarts with a failed rank
        cancel.cancel()

    async with trio.open_nursery() as nursery:
        for watcher in (exits, probes, loading, readings, planned, cut):
            nursery.start_soon(watcher, nursery.cancel_scope)
    exited = [f for f in found if isinstance(f, RankExited)]
    return exited[0] if exited else found[0] if found else None


def _decide(
    record: RankRecord, failure: SupervisorFailure, ctx: RankContext
) -> SupervisorFailure | None:
    """Restart (None) or stop everything (the failure, already recorded)."""
    rank = record.plan.rank
    if isinstance(failure, RankExited):
        logger.error(
            "rank %d exited unexpectedly: %s",
            rank,
            describe_returncode(failure.returncode),
            extra={"rank": rank},
        )
    escalate = None if ctx.board.stopping.is_set() else ctx.restarter.decide(failure)
    if ctx.board.stopping.is_set() or escalate is not None:
        record.fail()
        return ctx.fail(escalate or failure)
    record.restarting(failure)
    if ctx.restarter.scope is RestartScope.ALL:
        for other in ctx.board.ranks:
            if other is not record:
                other.request_restart(RestartedWith(other.plan.rank, failure), drain=False)
    return None
