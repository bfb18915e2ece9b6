"""Test support for supervised deployments.

* ``python -m trio_dpsup.testing.fake_rank``: a rank server with faults to inject, each a
  `Fault` (its `FaultKind` and parameters), sent by `Deployment.inject` or `inject_fault`;
* `open_cli_supervisor`: the CLI supervisor as a subprocess, with its log and control URL;
  `run_cli` runs it to its end (`CliResult`); `CLI` is the command line of both;
* `Harness` (the ``dpsup`` fixture of ``trio_dpsup.testing.plugin``, or `open_harness`):
  supervisors of fake ranks in either `Form`, each a `Deployment` to inject faults into,
  signal and watch through the typed `SupervisorStatus`, and a check that no process of its
  tree is left; its settings are `SupervisorSettings`, typed keywords;
* `open_load`: a closed-loop load of completion requests through a router (or to a rank),
  each request kept as a `LoadRequest` in the `Load`, with the event windows it fell in;
* `FakeNvml`, `no_nvml`: NVML where there is no GPU, for ``Supervisor(config, nvml=...)``;
* `free_port_range`, `alive`, `wait_pids_gone`, `read_pid_file`: ports and process checks.

May import: every room below it. It stands on top; the fake rank (fake_rank.py, faults.py)
imports only the standard library and `trio_dpsup.demo`, since it runs as a rank.
"""

import typing

from .. import _lazy

# The public names, for type checkers, and the same for the run time below (see
# trio_dpsup/_lazy.py). The fake rank runs as `python -m trio_dpsup.testing.fake_rank`:
# import nothing heavy here.
if typing.TYPE_CHECKING:
    from ._cli_process import CLI as CLI
    from ._cli_process import WAIT_TIMEOUT as WAIT_TIMEOUT
    from ._cli_process import CliResult as CliResult
    from ._cli_process import CliSupervisor as CliSupervisor
    from ._cli_process import open_cli_supervisor as open_cli_supervisor
    from ._cli_process import run_cli as run_cli
    from ._harness import FAKE_RANK as FAKE_RANK
    from ._harness import FAST_SETTINGS as FAST_SETTINGS
    from ._harness import Deployment as Deployment
    from ._harness import Form as Form
    from ._harness import Harness as Harness
    from ._harness import LeftoverProcesses as LeftoverProcesses
    from ._harness import NeedsFakeRank as NeedsFakeRank
    from ._harness import ProcessTree as ProcessTree
    from ._harness import cli_options as cli_options
    from ._harness import open_harness as open_harness
    from ._ports import free_port_range as free_port_range
    from ._procs import alive as alive
    from ._procs import read_pid_file as read_pid_file
    from ._procs import wait_pids_gone as wait_pids_gone
    from ._settings import SupervisorSettings as SupervisorSettings
    from .fake_nvml import FakeNvml as FakeNvml
    from .fake_nvml import no_nvml as no_nvml
    from .faults import Fault as Fault
    from .faults import FaultKind as FaultKind
    from .faults import inject_fault as inject_fault
    from .load import Load as Load
    from .load import LoadRequest as LoadRequest
    from .load import open_load as open_load

_EXPORTS = {
    "CLI": "._cli_process",
    "WAIT_TIMEOUT": "._cli_process",
    "CliResult": "._cli_process",
    "CliSupervisor": "._cli_process",
    "open_cli_supervisor": "._cli_process",
    "run_cli": "._cli_process",
    "FAKE_RANK": "._harness",
    "FAST_SETTINGS": "._harness",
    "Deployment": "._harness",
    "Form": "._harness",
    "Harness": "._harness",
    "LeftoverProcesses": "._harness",
    "NeedsFakeRank": "._harness",
    "ProcessTree": "._harness",
    "cli_options": "._harness",
    "open_harness": "._harness",
    "free_port_range": "._ports",
    "alive": "._procs",
    "read_pid_file": "._procs",
    "wait_pids_gone": "._procs",
    "SupervisorSettings": "._settings",
    "FakeNvml": ".fake_nvml",
    "no_nvml": ".fake_nvml",
    "Fault": ".faults",
    "FaultKind": ".faults",
    "inject_fault": ".faults",
    "Load": ".load",
    "LoadRequest": ".load",
    "open_load": ".load",
}
__getattr__, __dir__ = _lazy.lazy_exports(__name__, _EXPORTS)
