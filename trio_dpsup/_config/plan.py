"""The rank plan: for each local rank, its global rank, port, devices, environment and argv.

Everything here is pure and eager: `plan_ranks` either returns the full plan or raises
ConfigError naming the fix, before any process is started.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .._errors import ConfigError
from .._gpu.nvml import GpuInfo
from .._output.redact import redact_argv
from .config import SupervisorConfig, check_group, check_min_ready, check_port_range
from .devices import parse_visible_devices, resolve_devices_on, uses_indices
from .presets import apply_preset, check_preset_ranks, check_progress

__all__ = ["PLACEHOLDERS", "RankPlan", "plan_ranks", "resolve_devices"]

logger = logging.getLogger(__name__)

#: The placeholders a command template may use, and what each stands for.
PLACEHOLDERS: Mapping[str, str] = {
    "rank": "global data-parallel rank (start rank + local rank)",
    "local_rank": "rank on this node, from 0",
    "port": "the rank's port (base port + local rank)",
    "host": "the host ranks listen on",
    "gpus": "comma list of the rank's devices",
    "ranks": "number of local ranks",
}

# `{name}` is a placeholder; `{{` and `}}` are literal braces. Anything else with braces
# (JSON such as '{"max_tokens": 8}') passes through untouched, because vLLM options take JSON.
_TEMPLATE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


_T = TypeVar("_T")


@dataclass(frozen=True)
class RankPlan:
    """One rank, fully resolved. `env` holds only what the supervisor sets for this rank."""

    local_rank: int
    rank: int
    port: int
    devices: tuple[str, ...]
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    #: The NVML devices behind `devices`; empty when NVML is unavailable.
    gpus: tuple[GpuInfo, ...] = ()
    #: Options whose values are secret besides those redaction knows (see _output/redact.py).
    secret_options: tuple[str, ...] = ()

    @property
    def redacted_argv(self) -> tuple[str, ...]:
        return redact_argv(self.argv, self.secret_options)


def plan_ranks(
    config: SupervisorConfig,
    environ: Mapping[str, str],
    inventory: Sequence[GpuInfo] | None = None,
    *,
    nvml_problem: str | None = None,
) -> tuple[RankPlan, ...]:
    """Resolve `config` against `environ` (for CUDA_VISIBLE_DEVICES and PATH) and NVML's
    `inventory` (None: NVML is unavailable, for the reason `nvml_problem`).

    Raises ConfigError for an unknown placeholder, a command that cannot be run, too few
    devices, a device NVML does not have, or `ranks` missing when no device is known.
    """
    devices, source = resolve_devices(config, environ, inventory)
    if config.gpus == 0:
        devices = None  # ranks without GPUs: they are told so below, and need --ranks
    gpus = None
    if devices is not None and inventory is not None:
        gpus = resolve_devices_on(devices, inventory, source=source)
    command = config.command
    if config.preset is not None:
        command = apply_preset(config.preset, command, config.gpus, config.start_rank)
    ranks = _rank_count(config, devices, nvml_problem, source)
    check_fd_limit(ranks)
    check_port_range(config, ranks)
    check_min_ready(config, ranks)
    check_group(config, ranks)
    if config.preset is not None:
        check_preset_ranks(config.preset, command, config.start_rank, ranks)
        if config.progress_on:
            check_progress(config.preset, command)
    _check_placeholders(command, has_devices=devices is not None)
    plans = []
    for local_rank in range(ranks):
        own = () if devices is None else _slice(devices, local_rank, config.gpus)
        own_gpus = () if gpus is None else _slice(gpus, local_rank, config.gpus)
        values = {
            "rank": str(config.start_rank + local_rank),
            "local_rank": str(local_rank),
            "port": str(config.base_port + local_rank),
            "host": config.host,
            "gpus": ",".join(own),
            "ranks": str(ranks),
        }
        env = list(config.env)
        if devices is not None or config.gpus == 0:
            env.append(("CUDA_VISIBLE_DEVICES", ",".join(own)))
        if uses_indices(own):
            # CUDA's default order (fastest first) can differ from NVML's (PCI bus order).
            env.append(("CUDA_DEVICE_ORDER", "PCI_BUS_ID"))
        plans.append(
            RankPlan(
                local_rank=local_rank,
                rank=config.start_rank + local_rank,
                port=config.base_port + local_rank,
                devices=own,
                argv=tuple(_fill(arg, values) for arg in command),
                env=tuple(env),
                gpus=own_gpus,
                secret_options=config.secret_options,
            )
        )
    _check_executable(plans[0].argv[0], environ)
    return tuple(plans)


def resolve_devices(
    config: SupervisorConfig, environ: Mapping[str, str], inventory: Sequence[GpuInfo] | None
) -> tuple[tuple[str, ...] | None, str]:
    """The devices to hand out, and where they came from: `config.devices`, else
    CUDA_VISIBLE_DEVICES (read as CUDA reads it: empty or -1 means none), else every device
    NVML sees, else None (unknown)."""
    if config.devices is not None:
        source = "--devices"
        return parse_visible_devices(",".join(config.devices), strict=True, source=source), source
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        source = f"CUDA_VISIBLE_DEVICES={visible!r}"
        return parse_visible_devices(visible, strict=False, source=source), source
    if inventory is not None:
        return _all_devices(inventory), "NVML"
    return None, "nothing"


def _all_devices(inventory: Sequence[GpuInfo]) -> tuple[str, ...]:
    """Every GPU by index; where any GPU is split by MIG, every device by UUID instead (CUDA
    reaches MIG instances only by UUID), MIG instances in place of their parents."""
    parents = {g.parent_uuid for g in inventory if g.is_mig}
    if not parents:
        return tuple(str(g.index) for g in inventory)
    return tuple(g.uuid for g in inventory if g.uuid not in parents)


def _rank_count(
    config: SupervisorConfig,
    devices: tuple[str, ...] | None,
    nvml_problem: str | None,
    source: str,
) -> int:
    if devices is None:
        if config.ranks is None:
            why = "--gpus-per-rank is 0" if config.gpus == 0 else "no devices are known"
            if nvml_problem and config.gpus:
                why += f" (NVML is unavailable: {nvml_problem})"
            raise ConfigError(
                f"{why}, so the rank count cannot be derived: pass --ranks N "
                "(or --devices, or set CUDA_VISIBLE_DEVICES)"
            )
        if config.gpus and config.ranks > 1:
            # Without a device list every rank would see every GPU: they would all load onto
            # GPU 0, or fight over memory. Never start ranks silently unpinned.
            why = f" (NVML is unavailable: {nvml_problem})" if nvml_problem else ""
            raise ConfigError(
                f"no devices are known{why}, so {config.ranks} ranks with --gpus-per-rank "
                f"{config.gpus} would each see every GPU: name the devices with "
                "--devices (or CUDA_VISIBLE_DEVICES), or pass --gpus-per-rank 0 for ranks "
                "without GPUs"
            )
        if config.gpus:
            # One rank cannot collide with another: it sees what the server would see if
            # started by hand, so it starts, loudly.
            logger.warning(
                "no devices are known%s: the rank sees every GPU of this machine; name its "
                "devices with --devices or CUDA_VISIBLE_DEVICES to pin it",
                f" (NVML is unavailable: {nvml_problem})" if nvml_problem else "",
            )
        return config.ranks
    if not devices:
        raise ConfigError(
            f"no devices to hand out: only 0 are available ({source} names none): pass "
            "--gpus-per-rank 0 and --ranks N to run ranks without GPUs, or name devices with "
            "--devices or CUDA_VISIBLE_DEVICES"
        )
    available = len(devices) // config.gpus
    ranks = available if config.ranks is None else config.ranks
    if ranks < 1 or ranks * config.gpus > len(devices):
        wanted = (config.ranks or 1) * config.gpus
        raise ConfigError(
            f"{ranks or 1} ranks x {config.gpus} GPUs per rank need {wanted} devices, "
            f"but only {len(devices)} are available ({','.join(devices) or 'none'}): "
            f"lower --ranks or --gpus-per-rank, or pass more --devices"
        )
    return ranks


#: Open files the supervisor holds per rank: measured 8 at steady state with the canary
#: and the progress check on (17 fake ranks: 149) — the stdout and stderr pipes, a pidfd,
#: the probe's, the metrics reads' and the canary's connections, and the tree watch's two
#: kept /proc files per member (see _proc.membership.Trees.walk); with room for the tree
#: scans' pidfds and a restart's overlap of old and new process.
FDS_PER_RANK = 12
#: Open files the supervisor needs whatever the rank count (measured 11 with no rank: the
#: guardian's pipe, the control plane's listener, Python's own), with room for NVML.
FDS_BASE = 64


def control_connections(soft_fd_limit: int) -> int:
    """Connections the control plane keeps open at most: a quarter of the open-file limit,
    between 16 and 1024. Counted in `check_fd_limit`, so ranks and clients never compete
    for the last descriptors."""
    if soft_fd_limit < 0:  # RLIM_INFINITY
        return 1024
    return max(16, min(1024, soft_fd_limit // 4))


def check_fd_limit(ranks: int) -> None:
    """Raise ConfigError if `ranks` ranks and the control plane's connections need more
    open files than this process may open (the CLI first raises its soft limit to the
    hard one)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    need = FDS_BASE + ranks * FDS_PER_RANK + control_connections(soft)
    if need > soft:
        raise ConfigError(
            f"{ranks} ranks need about {need} open files, but this process may open only "
            f"{soft}: raise the limit (ulimit -n {need}, or LimitNOFILE={need} in a systemd "
            "unit) or run fewer ranks per supervisor"
        )


def _slice(devices: tuple[_T, ...], local_rank: int, per_rank: int) -> tuple[_T, ...]:
    return devices[local_rank * per_rank : (local_rank + 1) * per_rank]


def _check_placeholders(command: Sequence[str], *, has_devices: bool) -> None:
    known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    # Messages show an argument redacted: a usage error must not print an API key.
    for arg, shown in zip(command, redact_argv(command), strict=True):
        _check_braces(arg, shown, known)
        for match in _TEMPLATE.finditer(arg):
            name = match.group(1)
            if name is None:
                continue
            if name not in PLACEHOLDERS:
                raise ConfigError(
                    f"unknown placeholder {{{name}}} in {shown!r}: use one of {known} "
                    "(write {{ and }} for literal braces)"
                )
            if name == "gpus" and not has_devices:
                raise ConfigError(
                    "{gpus} is used but no devices are known: pass --devices or set "
                    "CUDA_VISIBLE_DEVICES"
                )


def _check_braces(arg: str, shown: str, known: str) -> None:
    """A brace that is not part of ``{name}``, ``{{`` or ``}}`` is a mistake (``{port``,
    ``{port!r}``, ``{}``), unless the argument, or its value after ``=``, is JSON: vLLM takes
    JSON options, and ``'{"max_tokens": 8}'`` must pass through untouched."""
    rest = _TEMPLATE.sub("0", arg)
    if "{" not in rest and "}" not in rest:
        return
    if arg.strip() == "{}":
        raise ConfigError(
            f"{{}} in the command is an empty placeholder: name one of {known}, "
            "or write {{}} for a literal {}"
        )
    for candidate in (rest, rest.partition("=")[2]):
        try:
            json.loads(candidate)
        except ValueError:
            continue
        return
    raise ConfigError(
        f"{shown!r} has a brace that is no placeholder: write placeholders as {known} "
        "(no format spec or conversion), and literal braces as {{ and }}"
    )


def _fill(arg: str, values: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text in ("{{", "}}"):
            return text[0]
        return values[match.group(1)]

    return _TEMPLATE.sub(replace, arg)


def _check_executable(program: str, environ: Mapping[str, str]) -> None:
    if os.sep in program:
        if os.path.isdir(program):
            raise ConfigError(
                f"command {program!r} is a directory: give the path of the server program"
            )
        if not os.path.isfile(program):
            raise ConfigError(f"command {program!r} does not exist: check the path after '--'")
        if not os.access(program, os.X_OK):
            raise ConfigError(
                f"command {program!r} is not executable: chmod +x it, or run it through "
                "its interpreter"
            )
        return
    if shutil.which(program, path=environ.get("PATH", os.defpath)) is None:
        raise ConfigError(
            f"command {program!r} is not found on PATH: install it, or give its full path"
        )
