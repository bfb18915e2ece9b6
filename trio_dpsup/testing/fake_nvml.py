"""An NVML you describe: GPUs, the processes on them, and their faults. For machines with no
GPU (CI), injected through ``Supervisor(config, nvml=fake.factory)``.

    fake = FakeNvml(gpus=2)
    supervisor = Supervisor(config, nvml=fake.factory)
    ...
    fake.place(rank_pid, fake.gpus[0].uuid, used_mib=512)  # what NVML would then report
    fake.lose(fake.gpus[1].uuid)                           # the GPU falls off the bus
    fake.xid(fake.gpus[0].uuid, 79)                        # a critical Xid error
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

from .._gpu.nvml import (
    MIB,
    GpuEvent,
    GpuInfo,
    GpuLost,
    GpuProcess,
    GpuSample,
    NvmlBackend,
    NvmlError,
    NvmlUnavailable,
)
from ._procs import alive

__all__ = ["FakeNvml", "no_nvml"]

_MEMORY = 80 * 1024 * MIB


class FakeNvml:
    """A thread-safe, in-memory `NvmlBackend`.

    `gpus` whole GPUs (``GPU-00000000-…-000000000000`` for index 0…), or the `GpuInfo`s
    given; `mig` splits GPU 0 into that many MIG instances. `xids_supported=False` answers
    as NVML does on machines that cannot report Xid events.
    """

    def __init__(
        self,
        gpus: int | Sequence[GpuInfo] = 2,
        *,
        mig: int = 0,
        xids_supported: bool = True,
    ) -> None:
        if isinstance(gpus, int):
            gpus = [
                GpuInfo(index=i, uuid=_uuid("GPU", i), name="Fake H100", memory_total=_MEMORY)
                for i in range(gpus)
            ]
        devices = list(gpus)
        if mig:
            parent = devices[0]
            devices[1:1] = [
                GpuInfo(
                    index=parent.index,
                    uuid=_uuid("MIG", 100 + m),
                    name=f"{parent.name} MIG 1g.10gb",
                    memory_total=parent.memory_total // mig,
                    parent_uuid=parent.uuid,
                    mig_index=m,
                )
                for m in range(mig)
            ]
        self.devices: tuple[GpuInfo, ...] = tuple(devices)
        self._lock = threading.Lock()
        self._processes: dict[str, dict[int, int]] = {d.uuid: {} for d in devices}
        self._lingering: set[int] = set()
        self._lost: set[str] = set()
        self._xids_supported = xids_supported
        self._watched: set[str] = set()
        self._events: queue.Queue[GpuEvent] = queue.Queue()
        #: How many times the supervisor opened and closed this backend.
        self.opened = 0
        self.closed = 0

    @property
    def gpus(self) -> tuple[GpuInfo, ...]:
        """The whole GPUs, by index."""
        return tuple(d for d in self.devices if not d.is_mig)

    def factory(self) -> NvmlBackend:
        """The `NvmlFactory` to give the supervisor."""
        with self._lock:
            self.opened += 1
        return self

    # -- what a test does -------------------------------------------------------------------

    def place(self, pid: int, uuid: str, used_mib: int = 1024, *, linger: bool = False) -> None:
        """Report `pid` as holding `used_mib` MiB in a compute context on device `uuid`,
        until it exits or is `remove`d; with `linger`, also after it exits, until removed
        (a driver still tearing its contexts down)."""
        with self._lock:
            self._processes[uuid][pid] = used_mib * MIB
            if linger:
                self._lingering.add(pid)

    def remove(self, pid: int) -> None:
        """The process released its contexts everywhere."""
        with self._lock:
            self._lingering.discard(pid)
            for procs in self._processes.values():
                procs.pop(pid, None)

    def lose(self, uuid: str) -> None:
        """From now on, NVML reports device `uuid` lost."""
        with self._lock:
            self._lost.add(uuid)

    def xid(self, uuid: str, xid: int) -> None:
        """Report a critical Xid error on device `uuid` (if it is watched, as NVML would)."""
        self._events.put(GpuEvent(uuid=uuid, xid=xid))

    # -- NvmlBackend -----------------------------------------------------------------------

    def inventory(self) -> tuple[GpuInfo, ...]:
        return self.devices

    def sample(self, uuid: str) -> GpuSample:
        device = self._device(uuid)
        used = sum(p.used_memory or 0 for p in self.processes(uuid))
        return GpuSample(
            uuid=uuid,
            memory_used=used,
            memory_total=device.memory_total,
            utilization=None if device.is_mig else (50 if used else 0),
            temperature=None if device.is_mig else 40,
            power=None if device.is_mig else 100.0,
        )

    def processes(self, uuid: str) -> tuple[GpuProcess, ...]:
        self._device(uuid)
        with self._lock:
            # As the driver does, a process that has exited holds nothing any more.
            procs = self._processes[uuid]
            for pid in [p for p in procs if p not in self._lingering and not alive(p)]:
                del procs[pid]
            return tuple(GpuProcess(pid, used) for pid, used in procs.items())

    def watch_xids(self, uuids: tuple[str, ...]) -> bool:
        with self._lock:
            self._watched.update(uuids)
        return self._xids_supported

    def wait_xid(self, timeout: float) -> GpuEvent | None:
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        with self._lock:
            watched = event.uuid in self._watched
        return event if watched else None

    def close(self) -> None:
        with self._lock:
            self.closed += 1

    def _device(self, uuid: str) -> GpuInfo:
        with self._lock:
            if uuid in self._lost:
                raise GpuLost(uuid, "GPU is lost")
        for device in self.devices:
            if device.uuid == uuid:
                return device
        raise NvmlError(f"{uuid}: Not Found")


def no_nvml(reason: str = "NVML Shared Library Not Found") -> NvmlBackend:
    """An `NvmlFactory` for a machine without NVML: ``Supervisor(config, nvml=no_nvml)``."""
    raise NvmlUnavailable(reason)


def _uuid(kind: str, n: int) -> str:
    return f"{kind}-{n:08x}-0000-4000-8000-{n:012x}"
