"""NVML for one run: opened before the rank plan (its inventory resolves the devices) and
closed after every rank has stopped. Every call runs in a worker thread: NVML blocks."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from .nvml import GpuInfo, NvmlBackend, NvmlError, NvmlFactory, NvmlUnavailable

__all__ = ["NvmlSession", "open_nvml"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NvmlSession:
    """NVML, open, and the devices it sees."""

    backend: NvmlBackend
    inventory: tuple[GpuInfo, ...]

    async def aclose(self) -> None:
        """**Cancellation**: shielded; waits for an abandoned Xid wait (half a second at
        most)."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.backend.close)


async def open_nvml(factory: NvmlFactory) -> tuple[NvmlSession | None, str | None]:
    """The session, or None and the reason NVML is unavailable (no driver, no library, a
    failed inventory): a run without NVML goes on without GPU readings.

    **Cancellation**: a cancelled open leaves NVML to close itself with the process.
    """
    try:
        backend = await trio.to_thread.run_sync(factory)
    except NvmlUnavailable as exc:
        logger.debug("NVML is unavailable: %s", exc)
        return None, str(exc)
    try:
        return NvmlSession(backend, await trio.to_thread.run_sync(backend.inventory)), None
    except NvmlError as exc:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(backend.close)
        logger.warning("NVML is unavailable: %s", exc)
        return None, str(exc)
