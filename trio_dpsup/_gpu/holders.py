"""Who holds a GPU's memory: the devices processes run on, each holder described, and what
is left holding memory after shutdown. NVML calls run in worker threads, one at a time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar, TypeVarTuple

import psutil
import trio

from .._proc.owners import Owner
from .nvml import MIB, GpuInfo, GpuProcess, NvmlBackend, NvmlError
from .placement import GpuHolder

__all__ = ["LEFTOVER_SETTLE", "find_leftovers", "gpu_holder", "leaf_devices", "nvml_call"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")

#: After shutdown, how long memory may take to be released before it counts as left over:
#: the driver frees a dead process's contexts shortly after its exit, not at it.
LEFTOVER_SETTLE = 3.0
_LEFTOVER_RECHECK = 0.25


def leaf_devices(inventory: Sequence[GpuInfo]) -> list[GpuInfo]:
    """The devices processes run on: MIG instances, and whole GPUs that have none."""
    split = {g.parent_uuid for g in inventory if g.is_mig}
    return [g for g in inventory if g.uuid not in split]


async def find_leftovers(
    backend: NvmlBackend, gpus: Sequence[GpuInfo], owner: Callable[[int], Owner]
) -> list[GpuHolder]:
    """After shutdown: each process still holding memory on `gpus`. Empty when none.

    Waits up to LEFTOVER_SETTLE for memory that is being released.

    **Cancellation**: safe; the caller shields it.
    """
    limiter = trio.CapacityLimiter(1)
    found: list[tuple[GpuInfo, GpuProcess]] = []
    with trio.move_on_after(LEFTOVER_SETTLE):
        for _ in range(int(LEFTOVER_SETTLE / _LEFTOVER_RECHECK) + 1):
            found = []
            for gpu in gpus:
                try:
                    procs = await nvml_call(limiter, backend.processes, gpu.uuid)
                except NvmlError as exc:
                    logger.warning("cannot list the processes on %s: %s", gpu.label, exc)
                    continue
                found += [(gpu, proc) for proc in procs]
            if not found:
                break
            await trio.sleep(_LEFTOVER_RECHECK)  # the driver is still tearing contexts down
    return [gpu_holder(gpu, proc, owner(proc.pid)) for gpu, proc in found]


def gpu_holder(gpu: GpuInfo, proc: GpuProcess, owner: Owner) -> GpuHolder:
    """`proc` on `gpu` described, with its name read from /proc now."""
    try:
        name: str | None = psutil.Process(proc.pid).name()
    except psutil.Error:
        name = None
    memory = None if proc.used_memory is None else proc.used_memory // MIB
    return GpuHolder(proc.pid, name, owner, memory, gpu.label)


async def nvml_call(
    limiter: trio.CapacityLimiter, call: Callable[[*_Args], _T], *args: *_Args
) -> _T:
    """`call(*args)` in a worker thread, one NVML call at a time."""
    return await trio.to_thread.run_sync(call, *args, limiter=limiter, abandon_on_cancel=True)
