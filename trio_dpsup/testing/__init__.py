"""Test support for supervised deployments.

* ``python -m trio_dpsup.testing.fake_rank``: a rank server with faults to inject;
* `open_cli_supervisor`: the CLI supervisor as a subprocess, with its log and control URL;
* `Harness` (the ``dpsup`` fixture of ``trio_dpsup.testing.plugin``): supervisors of fake
  ranks in either `Form`, each a `Deployment` to inject faults into, signal and watch, and a
  check that no process of its tree is left;
* `FakeNvml`, `no_nvml`: NVML where there is no GPU, for ``Supervisor(config, nvml=...)``;
* `free_port_range`, `alive`, `wait_pids_gone`, `read_pid_file`: ports and process checks.
"""

import typing

from .. import _lazy

if typing.TYPE_CHECKING:  # the names for type checkers; at run time they load on first use
    from ._cli_process import CliSupervisor, open_cli_supervisor
    from ._harness import FAKE_RANK, Deployment, Form, Harness, LeftoverProcesses, ProcessTree
    from ._ports import free_port_range
    from ._procs import alive, read_pid_file, wait_pids_gone
    from .fake_nvml import FakeNvml, no_nvml

__all__ = [
    "FAKE_RANK",
    "CliSupervisor",
    "Deployment",
    "FakeNvml",
    "Form",
    "Harness",
    "LeftoverProcesses",
    "ProcessTree",
    "alive",
    "free_port_range",
    "no_nvml",
    "open_cli_supervisor",
    "read_pid_file",
    "wait_pids_gone",
]

# The fake rank runs as `python -m trio_dpsup.testing.fake_rank`: import nothing heavy here.
__getattr__, __dir__ = _lazy.lazy_exports(
    __name__,
    {
        "._cli_process": ["CliSupervisor", "open_cli_supervisor"],
        "._harness": [
            "FAKE_RANK",
            "Deployment",
            "Form",
            "Harness",
            "LeftoverProcesses",
            "ProcessTree",
        ],
        "._ports": ["free_port_range"],
        "._procs": ["alive", "read_pid_file", "wait_pids_gone"],
        ".fake_nvml": ["FakeNvml", "no_nvml"],
    },
)
