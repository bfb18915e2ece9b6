"""Device lists: CUDA_VISIBLE_DEVICES and --devices, parsed and matched against NVML.

A device is named by an index (NVML's, which is PCI bus order), a GPU UUID (``GPU-…``, or a
unique prefix of one, as CUDA accepts) or a MIG UUID (``MIG-…``). Ranks get the names they
were given, so ``{gpus}`` reads as the user wrote it; indices come with
CUDA_DEVICE_ORDER=PCI_BUS_ID, under which CUDA numbers GPUs as NVML does (its default order,
fastest first, can differ).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .._errors import ConfigError
from .._gpu.nvml import GpuInfo
from .config import check_unique_devices

__all__ = ["parse_visible_devices", "resolve_devices_on", "uses_indices"]

_INDEX = re.compile(r"\d+")
_UUID = re.compile(r"(GPU|MIG)-[0-9A-Za-z/-]+")


def parse_visible_devices(text: str, *, strict: bool, source: str) -> tuple[str, ...]:
    """The device names in `text`, a comma list.

    CUDA's own reading of CUDA_VISIBLE_DEVICES (``strict=False``): entries up to the first
    that is not a device, so ``-1`` or an empty string means no GPU. ``--devices``
    (``strict=True``) refuses anything that is not a device, naming `source`.
    """
    devices: list[str] = []
    for raw in text.split(","):
        entry = raw.strip()
        if _INDEX.fullmatch(entry):
            entry = str(int(entry))  # "01" and "1" are the same GPU
        elif not _UUID.fullmatch(entry):
            if strict:
                raise ConfigError(
                    f"{source} has {entry!r}, which is not a device: list indices (0,1), "
                    "GPU UUIDs (GPU-…) or MIG UUIDs (MIG-…), separated by commas"
                )
            break  # CUDA ignores the rest of the list from here
        devices.append(entry)
    check_unique_devices(devices, f"in {source}")
    return tuple(devices)


def uses_indices(devices: Sequence[str]) -> bool:
    return any(_INDEX.fullmatch(d) for d in devices)


def resolve_devices_on(
    devices: Sequence[str], inventory: Sequence[GpuInfo], *, source: str
) -> tuple[GpuInfo, ...]:
    """The NVML device behind each name. Raises ConfigError for one NVML does not have."""
    gpus = [g for g in inventory if not g.is_mig]
    resolved = []
    for name in devices:
        if _INDEX.fullmatch(name):
            index = int(name)
            if index >= len(gpus):
                raise ConfigError(
                    f"{source} names GPU {index}, but NVML sees {len(gpus)} GPU(s) "
                    f"(0-{len(gpus) - 1}): name GPUs that exist"
                )
            resolved.append(gpus[index])
            continue
        matches = [g for g in inventory if g.uuid == name] or [
            g for g in inventory if g.uuid.startswith(name)
        ]
        if len(matches) != 1:
            problem = "no device" if not matches else f"{len(matches)} devices"
            raise ConfigError(
                f"{source} names {name}, which matches {problem} NVML sees: use a full UUID "
                "from `nvidia-smi -L`"
            )
        resolved.append(matches[0])
    labels = [g.label for g in resolved]
    check_unique_devices(labels, f"in {source} (by index and by UUID?)")
    return tuple(resolved)
