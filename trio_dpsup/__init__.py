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
from ._version import __version__ as __version__

# The public names, for type checkers: at run time this block is skipped. Ranks run
# `python -m trio_dpsup.demo`, so this package must import nothing heavy (see _lazy).
if typing.TYPE_CHECKING:
    from ._config.canary import CanaryRequest as CanaryRequest
    from ._config.config import SupervisorConfig as SupervisorConfig
    from ._config.enums import LogFormat as LogFormat
    from ._config.enums import RankScheme as RankScheme
    from ._config.enums import RestartPolicy as RestartPolicy
    from ._config.enums import RestartScope as RestartScope
    from ._config.plan import RankPlan as RankPlan
    from ._config.plan import plan_ranks as plan_ranks
    from ._config.presets import Preset as Preset
    from ._config.routers import RouterKind as RouterKind
    from ._config.routers import RouterSpec as RouterSpec
    from ._errors import ConfigError as ConfigError
    from ._errors import GenerationFailed as GenerationFailed
    from ._errors import GpuFailed as GpuFailed
    from ._errors import GpuLeftovers as GpuLeftovers
    from ._errors import GpuMemoryHeld as GpuMemoryHeld
    from ._errors import GroupFailed as GroupFailed
    from ._errors import PortInUse as PortInUse
    from ._errors import RankExited as RankExited
    from ._errors import RankSpawnFailed as RankSpawnFailed
    from ._errors import RankStalled as RankStalled
    from ._errors import RankStartTimeout as RankStartTimeout
    from ._errors import RankUnhealthy as RankUnhealthy
    from ._errors import RestartedWith as RestartedWith
    from ._errors import RestartRequested as RestartRequested
    from ._errors import RestartsExhausted as RestartsExhausted
    from ._errors import StartupStalled as StartupStalled
    from ._errors import StartupTimeout as StartupTimeout
    from ._errors import SupervisorFailure as SupervisorFailure
    from ._errors import SupervisorStopped as SupervisorStopped
    from ._gpu.nvml import GpuEvent as GpuEvent
    from ._gpu.nvml import GpuInfo as GpuInfo
    from ._gpu.nvml import GpuLost as GpuLost
    from ._gpu.nvml import GpuProcess as GpuProcess
    from ._gpu.nvml import GpuSample as GpuSample
    from ._gpu.nvml import NvmlBackend as NvmlBackend
    from ._gpu.nvml import NvmlError as NvmlError
    from ._gpu.nvml import NvmlFactory as NvmlFactory
    from ._gpu.nvml import NvmlUnavailable as NvmlUnavailable
    from ._gpu.nvml import open_pynvml as open_pynvml
    from ._gpu.placement import GpuHolder as GpuHolder
    from ._gpu.placement import IssueKind as IssueKind
    from ._gpu.placement import Placement as Placement
    from ._gpu.placement import PlacementIssue as PlacementIssue
    from ._gpu.placement import PlacementVerdict as PlacementVerdict
    from ._proc.owners import Owner as Owner
    from ._proc.owners import OwnerKind as OwnerKind
    from ._proc.owners import PortHolder as PortHolder
    from ._state.status import CanaryResult as CanaryResult
    from ._state.status import CanaryStatus as CanaryStatus
    from ._state.status import DrainEnd as DrainEnd
    from ._state.status import DrainReason as DrainReason
    from ._state.status import DrainStatus as DrainStatus
    from ._state.status import GroupStatus as GroupStatus
    from ._state.status import MemberState as MemberState
    from ._state.status import MemberStatus as MemberStatus
    from ._state.status import ProbeResult as ProbeResult
    from ._state.status import ProgressStatus as ProgressStatus
    from ._state.status import RankState as RankState
    from ._state.status import RankStatus as RankStatus
    from ._state.status import RootCause as RootCause
    from ._state.status import RouterStatus as RouterStatus
    from ._state.status import StartupProgress as StartupProgress
    from ._state.status import SupervisorState as SupervisorState
    from ._state.status import SupervisorStatus as SupervisorStatus
    from ._supervisor import Supervisor as Supervisor
    from ._supervisor import SupervisorHandle as SupervisorHandle

# The same names for the run time: `_lazy` serves each from its module on first use.
# tests/test_public_api.py holds that this table and the block above agree exactly.
_EXPORTS = {
    "CanaryRequest": "._config.canary",
    "SupervisorConfig": "._config.config",
    "LogFormat": "._config.enums",
    "RankScheme": "._config.enums",
    "RestartPolicy": "._config.enums",
    "RestartScope": "._config.enums",
    "RankPlan": "._config.plan",
    "plan_ranks": "._config.plan",
    "Preset": "._config.presets",
    "RouterKind": "._config.routers",
    "RouterSpec": "._config.routers",
    "ConfigError": "._errors",
    "GenerationFailed": "._errors",
    "GpuFailed": "._errors",
    "GpuLeftovers": "._errors",
    "GpuMemoryHeld": "._errors",
    "GroupFailed": "._errors",
    "PortInUse": "._errors",
    "RankExited": "._errors",
    "RankSpawnFailed": "._errors",
    "RankStalled": "._errors",
    "RankStartTimeout": "._errors",
    "RankUnhealthy": "._errors",
    "RestartedWith": "._errors",
    "RestartRequested": "._errors",
    "RestartsExhausted": "._errors",
    "StartupStalled": "._errors",
    "StartupTimeout": "._errors",
    "SupervisorFailure": "._errors",
    "SupervisorStopped": "._errors",
    "GpuEvent": "._gpu.nvml",
    "GpuInfo": "._gpu.nvml",
    "GpuLost": "._gpu.nvml",
    "GpuProcess": "._gpu.nvml",
    "GpuSample": "._gpu.nvml",
    "NvmlBackend": "._gpu.nvml",
    "NvmlError": "._gpu.nvml",
    "NvmlFactory": "._gpu.nvml",
    "NvmlUnavailable": "._gpu.nvml",
    "open_pynvml": "._gpu.nvml",
    "GpuHolder": "._gpu.placement",
    "IssueKind": "._gpu.placement",
    "Placement": "._gpu.placement",
    "PlacementIssue": "._gpu.placement",
    "PlacementVerdict": "._gpu.placement",
    "Owner": "._proc.owners",
    "OwnerKind": "._proc.owners",
    "PortHolder": "._proc.owners",
    "CanaryResult": "._state.status",
    "CanaryStatus": "._state.status",
    "DrainEnd": "._state.status",
    "DrainReason": "._state.status",
    "DrainStatus": "._state.status",
    "GroupStatus": "._state.status",
    "MemberState": "._state.status",
    "MemberStatus": "._state.status",
    "ProbeResult": "._state.status",
    "ProgressStatus": "._state.status",
    "RankState": "._state.status",
    "RankStatus": "._state.status",
    "RootCause": "._state.status",
    "RouterStatus": "._state.status",
    "StartupProgress": "._state.status",
    "SupervisorState": "._state.status",
    "SupervisorStatus": "._state.status",
    "Supervisor": "._supervisor",
    "SupervisorHandle": "._supervisor",
}
__getattr__, __dir__ = _lazy.lazy_exports(__name__, _EXPORTS)
