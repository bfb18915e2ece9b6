"""trio_dpsup: a Trio supervisor for data-parallel LLM inference servers.

Start one HTTP server per rank, watch them, serve a control plane for probes, and tear
everything down in a strict order on request or on the first failure::

    config = SupervisorConfig(command=("python", "-m", "trio_dpsup.demo", "--port", "{port}"),
                              ranks=2, base_port=8000, control_port=9000)
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(Supervisor(config).run)
        await handle.wait_ready()
        ...
        handle.request_shutdown()
"""

import typing

from . import _lazy

if typing.TYPE_CHECKING:  # the names for type checkers; at run time they load on first use
    from ._config.config import RankScheme, SupervisorConfig
    from ._config.plan import RankPlan, plan_ranks
    from ._config.presets import Preset
    from ._errors import (
        ConfigError,
        GpuFailed,
        GpuLeftovers,
        RankExited,
        RankSpawnFailed,
        RankStartTimeout,
        RankUnhealthy,
        RestartsExhausted,
        StartupTimeout,
        SupervisorFailure,
        SupervisorStopped,
    )
    from ._gpu.nvml import GpuInfo, GpuSample, NvmlBackend, NvmlUnavailable
    from ._gpu.placement import Placement, PlacementIssue, PlacementVerdict
    from ._restart import RestartPolicy, RestartScope
    from ._state import ProbeResult, RankState, RankStatus, SupervisorState, SupervisorStatus
    from ._supervisor import Supervisor, SupervisorHandle

__all__ = [
    "ConfigError",
    "GpuFailed",
    "GpuInfo",
    "GpuLeftovers",
    "GpuSample",
    "NvmlBackend",
    "NvmlUnavailable",
    "Placement",
    "PlacementIssue",
    "PlacementVerdict",
    "Preset",
    "ProbeResult",
    "RankExited",
    "RankPlan",
    "RankScheme",
    "RankSpawnFailed",
    "RankStartTimeout",
    "RankState",
    "RankStatus",
    "RankUnhealthy",
    "RestartPolicy",
    "RestartScope",
    "RestartsExhausted",
    "StartupTimeout",
    "Supervisor",
    "SupervisorConfig",
    "SupervisorFailure",
    "SupervisorHandle",
    "SupervisorState",
    "SupervisorStatus",
    "SupervisorStopped",
    "plan_ranks",
]

__version__ = "0.1.0"

# Ranks run `python -m trio_dpsup.demo`: this package must import nothing heavy (see _lazy).
__getattr__, __dir__ = _lazy.lazy_exports(
    __name__,
    {
        "._config.config": ["RankScheme", "SupervisorConfig"],
        "._errors": [
            "ConfigError",
            "GpuFailed",
            "GpuLeftovers",
            "RankExited",
            "RankSpawnFailed",
            "RankStartTimeout",
            "RankUnhealthy",
            "RestartsExhausted",
            "StartupTimeout",
            "SupervisorFailure",
            "SupervisorStopped",
        ],
        "._gpu.nvml": ["GpuInfo", "GpuSample", "NvmlBackend", "NvmlUnavailable"],
        "._gpu.placement": ["Placement", "PlacementIssue", "PlacementVerdict"],
        "._config.plan": ["RankPlan", "plan_ranks"],
        "._config.presets": ["Preset"],
        "._restart": ["RestartPolicy", "RestartScope"],
        "._state": [
            "ProbeResult",
            "RankState",
            "RankStatus",
            "SupervisorState",
            "SupervisorStatus",
        ],
        "._supervisor": ["Supervisor", "SupervisorHandle"],
    },
)
