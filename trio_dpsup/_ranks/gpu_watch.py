"""GPU monitoring of the ranks: readings per rank, the placement check, GPU faults.

Every NVML call runs in a worker thread (NVML blocks, for seconds on a sick GPU), one at a
time through a limiter of 1: the event loop never waits on the driver.

* every `gpu_interval` seconds, each rank's devices are read (memory, utilisation,
  temperature, power) into its /status entry;
* once every rank is ready, and on each refresh after that, the placement is checked;
* a device NVML reports lost, or a critical Xid error on a rank's device, fails that rank
  (`GpuFailed`), which takes the normal teardown path.

Who holds a device's memory, and what is left after shutdown, is `_gpu.holders`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import trio

from .._errors import GpuFailed, GpuLeftovers, SupervisorFailure
from .._gpu.holders import find_leftovers, leaf_devices, nvml_call
from .._gpu.nvml import GpuEvent, GpuInfo, GpuLost, NvmlBackend, NvmlError, XidSeen
from .._gpu.placement import PENDING, Placement, PlacementVerdict, check_placement
from .._gpu.session import NvmlSession
from .._proc.owners import Owner
from .._state.board import Board, RankRecord
from .._state.status import RankState
from .context import RankContext

__all__ = ["report_leftovers", "run_gpu_watch"]

logger = logging.getLogger(__name__)

#: How long one wait for an Xid event blocks its thread: the longest a cancelled wait lingers.
_XID_WAIT = 0.5


async def run_gpu_watch(
    nvml: NvmlSession | None,
    ctx: RankContext,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`run_gpu_monitor` of the ranks over `nvml`; without NVML, every rank's placement is
    marked unavailable (with a warning where ranks have devices) and this returns at once.

    **Cancellation**: as `run_gpu_monitor`'s.
    """
    board = ctx.board
    if nvml is not None:
        await run_gpu_monitor(
            nvml.backend,
            nvml.inventory,
            board,
            interval=ctx.settings.gpu_watch.gpu_interval,
            fail=ctx.fail,
            owner=ctx.owner,
            task_status=task_status,
        )
        return
    unavailable = Placement(PlacementVerdict.UNAVAILABLE, note=board.nvml_unavailable)
    for record in board.ranks:
        record.place(unavailable)
    if any(record.plan.devices for record in board.ranks):
        logger.warning(
            "NVML is unavailable (%s): no GPU readings, placement checks, GPU fault "
            "detection or leftover report",
            board.nvml_unavailable,
        )
    task_status.started()


async def report_leftovers(
    nvml: NvmlSession | None, board: Board, owner: Callable[[int], Owner], *, fail: bool
) -> None:
    """After every rank stopped: log each process still holding memory on the ranks'
    devices; with `fail` (--fail-on-leftovers), a clean run becomes a `GpuLeftovers` failure.

    **Cancellation**: shielded; bounded by `LEFTOVER_SETTLE`.
    """
    gpus = [gpu for record in board.ranks for gpu in record.plan.gpus]
    if nvml is None or not gpus:
        return
    with trio.CancelScope(shield=True):
        leftovers = await find_leftovers(nvml.backend, gpus, owner)
    for holder in leftovers:
        logger.error("left over after shutdown: %s", holder.describe())
    if leftovers and fail and board.failure is None:
        board.fail(GpuLeftovers(tuple(leftovers)))


async def run_gpu_monitor(
    backend: NvmlBackend,
    inventory: Sequence[GpuInfo],
    board: Board,
    *,
    interval: float,
    fail: Callable[[SupervisorFailure], SupervisorFailure],
    owner: Callable[[int], Owner],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Refresh readings and placement until cancelled; fail a rank whose GPU fails.

    **Cancellation**: prompt. A thread in an NVML call is abandoned and finishes by itself
    (an Xid wait within half a second); the backend must be closed only after this returns.
    """
    limiter = trio.CapacityLimiter(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_xids, backend, board, fail, limiter)
        task_status.started()
        while True:
            try:
                await _refresh(backend, board, limiter)
                if board.started:
                    await _check_placement(backend, board, inventory, owner, limiter)
            except GpuLost as lost:
                _fail_ranks_on(board, lost.uuid, f"NVML reports it lost ({lost.reason})", fail)
                return
            except NvmlError as exc:
                # Readings are best effort: a failed one is logged, not a rank failure.
                logger.warning("GPU reading failed: %s", exc)
            with trio.move_on_after(interval):
                if board.started:
                    await trio.sleep_forever()
                # The first placement check comes as soon as every rank is ready.
                await board.all_ready.wait()


async def _refresh(backend: NvmlBackend, board: Board, limiter: trio.CapacityLimiter) -> None:
    for record in board.ranks:
        uuids = [gpu.uuid for gpu in record.plan.gpus]
        record.note_gpus(tuple([await nvml_call(limiter, backend.sample, uuid) for uuid in uuids]))


async def _check_placement(
    backend: NvmlBackend,
    board: Board,
    inventory: Sequence[GpuInfo],
    owner: Callable[[int], Owner],
    limiter: trio.CapacityLimiter,
) -> None:
    on_device = {
        gpu.uuid: await nvml_call(limiter, backend.processes, gpu.uuid)
        for gpu in leaf_devices(inventory)
    }
    ranks = {r.plan.rank: [gpu.uuid for gpu in r.plan.gpus] for r in board.ranks}
    verdicts = await trio.to_thread.run_sync(check_placement, ranks, on_device, owner)
    for record in board.ranks:
        # A rank that is (re)starting has no process on its GPU yet: that is no misplacement.
        ready = record.state is RankState.READY
        _set_placement(record, verdicts[record.plan.rank] if ready else PENDING)


def _set_placement(record: RankRecord, placement: Placement) -> None:
    """Log a verdict when it changes: a misplaced rank is a warning, not a failure."""
    if not record.place(placement):
        return
    rank = record.plan.rank
    if placement.verdict is PlacementVerdict.MISPLACED:
        for issue in placement.issues:
            logger.warning("placement: %s", issue.describe(rank))
    elif placement.verdict is PlacementVerdict.UNKNOWN:
        logger.warning("placement of rank %d unknown: %s", rank, placement.note)
    else:
        logger.info("placement of rank %d: %s", rank, placement.verdict.value)


async def _watch_xids(
    backend: NvmlBackend,
    board: Board,
    fail: Callable[[SupervisorFailure], SupervisorFailure],
    limiter: trio.CapacityLimiter,
) -> None:
    uuids = tuple(dict.fromkeys(gpu.uuid for r in board.ranks for gpu in r.plan.gpus))
    if not uuids:
        return
    try:
        if not await nvml_call(limiter, backend.watch_xids, uuids):
            logger.warning("NVML cannot report Xid events here: GPU errors are seen by probes")
            return
        while True:
            # Not through the limiter: this wait blocks for up to _XID_WAIT, and readings
            # must not queue behind it. NVML's calls are thread-safe.
            event: GpuEvent | None = await trio.to_thread.run_sync(
                backend.wait_xid, _XID_WAIT, abandon_on_cancel=True
            )
            if event is not None:
                logger.error("critical Xid %d on GPU %s", event.xid, event.uuid)
                board.note_xid(XidSeen(time.time(), event))
                _fail_ranks_on(board, event.uuid, f"critical Xid error {event.xid}", fail)
    except NvmlError as exc:
        logger.warning("Xid events stopped (%s): GPU errors are seen by probes only", exc)


def _fail_ranks_on(
    board: Board,
    uuid: str,
    cause: str,
    fail: Callable[[SupervisorFailure], SupervisorFailure],
) -> None:
    """Fail the first rank using device `uuid` (or a MIG instance of it): one failure is
    enough to stop every rank, and it names the rank and the device."""
    for record in board.ranks:
        for gpu in record.plan.gpus:
            if uuid in (gpu.uuid, gpu.parent_uuid):
                logger.error("rank %d: %s failed: %s", record.plan.rank, gpu.label, cause)
                fail(GpuFailed(record.plan.rank, gpu.label, cause))
                return
