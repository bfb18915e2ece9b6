"""What the supervisor asks of NVML, as a small interface, and its implementation on pynvml.

`NvmlBackend` is the injection point: the supervisor takes a factory for one, so tests (and
machines with no GPU) run with `trio_dpsup.testing.FakeNvml`. Every method blocks (NVML is a
C library that can stall for seconds on a sick GPU): callers run them in a thread, never on
the event loop.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "GpuEvent",
    "GpuInfo",
    "GpuLost",
    "GpuProcess",
    "GpuSample",
    "NvmlBackend",
    "NvmlError",
    "NvmlFactory",
    "NvmlUnavailable",
    "PynvmlBackend",
    "open_pynvml",
]

MIB = 1024 * 1024


class NvmlUnavailable(Exception):
    """NVML cannot be used here (no driver, no library, no GPU): the reason is the message."""


class NvmlError(Exception):
    """An NVML call failed for a reason other than a lost GPU."""


class GpuLost(NvmlError):
    """NVML reports the GPU `uuid` lost (fallen off the bus, or needing a reset)."""

    def __init__(self, uuid: str, reason: str) -> None:
        super().__init__(f"GPU {uuid} is lost: {reason}")
        self.uuid = uuid
        self.reason = reason


@dataclass(frozen=True)
class GpuInfo:
    """One device CUDA can be given: a whole GPU, or a MIG instance of one."""

    #: NVML's index of the GPU (PCI bus order); for a MIG instance, its parent's.
    index: int
    #: ``GPU-…`` or ``MIG-…``: what CUDA_VISIBLE_DEVICES accepts, and never renumbered.
    uuid: str
    name: str
    memory_total: int
    #: The physical GPU's UUID for a MIG instance; None for a whole GPU.
    parent_uuid: str | None = None
    #: The instance's number within its parent, for a MIG instance.
    mig_index: int | None = None

    @property
    def is_mig(self) -> bool:
        return self.parent_uuid is not None

    @property
    def label(self) -> str:
        """How logs name it: ``GPU 1 (GPU-8a…)`` or ``GPU 1 MIG 0 (MIG-…)``."""
        mig = "" if self.mig_index is None else f" MIG {self.mig_index}"
        return f"GPU {self.index}{mig} ({self.uuid})"


@dataclass(frozen=True)
class GpuSample:
    """One reading of a device. None: NVML does not report it for this device (MIG)."""

    uuid: str
    memory_used: int
    memory_total: int
    utilization: int | None  # percent
    temperature: int | None  # degrees Celsius
    power: float | None  # watts


@dataclass(frozen=True)
class GpuProcess:
    """A process holding a compute context on a device, as NVML reports it."""

    pid: int
    #: Bytes of device memory, or None where NVML cannot say.
    used_memory: int | None


@dataclass(frozen=True)
class GpuEvent:
    """A critical Xid error reported on device `uuid`."""

    uuid: str
    xid: int


@dataclass(frozen=True)
class XidSeen:
    """A critical Xid error as the supervisor saw it: when (wall clock) and what."""

    at: float
    event: GpuEvent


class NvmlBackend(Protocol):
    """The NVML calls the supervisor makes. Every method blocks; all are thread-safe.
    Failures raise `NvmlError` (`GpuLost` when the device is gone)."""

    def inventory(self) -> tuple[GpuInfo, ...]:
        """Every GPU, in NVML index order, each followed by its MIG instances if any."""
        ...

    def sample(self, uuid: str) -> GpuSample:
        """Memory, utilisation, temperature and power of a device. Raises GpuLost."""
        ...

    def processes(self, uuid: str) -> tuple[GpuProcess, ...]:
        """Processes with a compute context on a device. Raises GpuLost."""
        ...

    def watch_xids(self, uuids: tuple[str, ...]) -> bool:
        """Start collecting critical Xid events of these devices; False if unsupported."""
        ...

    def wait_xid(self, timeout: float) -> GpuEvent | None:
        """The next critical Xid event, or None after `timeout` seconds without one."""
        ...

    def close(self) -> None: ...


#: How the supervisor gets a backend: called once per run, in a thread. Raises NvmlUnavailable.
NvmlFactory = Callable[[], NvmlBackend]


class PynvmlBackend:
    """`NvmlBackend` on the pynvml module of nvidia-ml-py."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()  # pynvml's event set is not safe to share unlocked
        self._events: Any = None
        self._by_handle: dict[int, str] = {}

    def inventory(self) -> tuple[GpuInfo, ...]:
        try:
            return self._inventory()
        except self._nvml.NVMLError as exc:
            raise NvmlError(f"listing GPUs: {exc}") from exc

    def _inventory(self) -> tuple[GpuInfo, ...]:
        nvml = self._nvml
        found: list[GpuInfo] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            found.append(
                GpuInfo(
                    index=index,
                    uuid=uuid,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_total=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                )
            )
            found += self._mig_instances(handle, index, uuid)
        return tuple(found)

    def sample(self, uuid: str) -> GpuSample:
        nvml = self._nvml
        handle = self._handle(uuid)
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            return GpuSample(
                uuid=uuid,
                memory_used=int(memory.used),
                memory_total=int(memory.total),
                utilization=self._optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                temperature=self._optional(
                    lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
                ),
                power=self._optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000),
            )
        except nvml.NVMLError as exc:
            raise self._lost_or(exc, uuid) from exc

    def processes(self, uuid: str) -> tuple[GpuProcess, ...]:
        nvml = self._nvml
        try:
            found = nvml.nvmlDeviceGetComputeRunningProcesses(self._handle(uuid))
        except nvml.NVMLError as exc:
            raise self._lost_or(exc, uuid) from exc
        return tuple(
            GpuProcess(
                pid=int(p.pid),
                used_memory=None if p.usedGpuMemory is None else int(p.usedGpuMemory),
            )
            for p in found
        )

    def watch_xids(self, uuids: tuple[str, ...]) -> bool:
        nvml = self._nvml
        with self._lock:
            try:
                self._events = nvml.nvmlEventSetCreate()
                for uuid in uuids:
                    handle = self._handle(uuid)
                    nvml.nvmlDeviceRegisterEvents(
                        handle, nvml.nvmlEventTypeXidCriticalError, self._events
                    )
                    self._by_handle[_address(handle)] = uuid
            except nvml.NVMLError_NotSupported:
                return False
            except nvml.NVMLError as exc:
                raise NvmlError(f"watching Xid events: {exc}") from exc
        return True

    def wait_xid(self, timeout: float) -> GpuEvent | None:
        nvml = self._nvml
        # Under the lock: `close` must not free the event set while a wait is using it.
        with self._lock:
            if self._events is None:
                return None
            try:
                data = nvml.nvmlEventSetWait_v2(self._events, int(timeout * 1000))
            except nvml.NVMLError_Timeout:
                return None
            except nvml.NVMLError as exc:
                raise NvmlError(f"waiting for Xid events: {exc}") from exc
        uuid = self._by_handle.get(_address(data.device))
        if uuid is None:  # a MIG instance or a device we did not register: ask NVML
            uuid = _text(nvml.nvmlDeviceGetUUID(data.device))
        return GpuEvent(uuid=uuid, xid=int(data.eventData))

    def close(self) -> None:
        nvml = self._nvml
        with self._lock:
            if self._events is not None:
                nvml.nvmlEventSetFree(self._events)
                self._events = None
        nvml.nvmlShutdown()

    def _handle(self, uuid: str) -> Any:
        nvml = self._nvml
        try:
            return nvml.nvmlDeviceGetHandleByUUID(uuid)
        except nvml.NVMLError as exc:
            raise self._lost_or(exc, uuid) from exc

    def _mig_instances(self, handle: Any, index: int, parent: str) -> list[GpuInfo]:
        nvml = self._nvml
        try:
            current, _ = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:
            return []  # no MIG on this GPU
        if current != nvml.NVML_DEVICE_MIG_ENABLE:
            return []
        found = []
        for mig_index in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, mig_index)
            except nvml.NVMLError_NotFound:
                continue  # an empty slot
            found.append(
                GpuInfo(
                    index=index,
                    uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                    name=_text(nvml.nvmlDeviceGetName(mig)),
                    memory_total=int(nvml.nvmlDeviceGetMemoryInfo(mig).total),
                    parent_uuid=parent,
                    mig_index=mig_index,
                )
            )
        return found

    def _optional(self, read: Callable[[], Any]) -> Any:
        """A reading NVML may not support on this device (MIG instances have no power)."""
        try:
            value = read()
        except self._nvml.NVMLError_NotSupported:
            return None
        return round(value, 1) if isinstance(value, float) else int(value)

    def _lost_or(self, exc: Exception, uuid: str) -> NvmlError:
        nvml = self._nvml
        lost = (nvml.NVML_ERROR_GPU_IS_LOST, nvml.NVML_ERROR_RESET_REQUIRED)
        if getattr(exc, "value", None) in lost:
            return GpuLost(uuid, str(exc))
        return NvmlError(f"{uuid}: {exc}")


def open_pynvml() -> NvmlBackend:
    """Initialise NVML through pynvml. Raises NvmlUnavailable with the reason it cannot."""
    try:
        import pynvml
    except ImportError as exc:  # nvidia-ml-py is a dependency, but may be missing in a venv
        raise NvmlUnavailable(
            f"the pynvml module is missing ({exc}): pip install nvidia-ml-py"
        ) from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(f"NVML could not start: {exc}") from exc
    return PynvmlBackend(pynvml)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _address(handle: Any) -> int:
    """A device handle's identity: pynvml hands out new wrapper objects for the same device."""
    return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)
