"""Test support for supervised deployments.

* ``python -m trio_dpsup.testing.fake_rank``: a rank server with faults to inject;
* `open_cli_supervisor`: the CLI supervisor as a subprocess, with its log and control URL;
* `free_port_range`, `alive`, `wait_pids_gone`, `read_pid_file`: ports and process checks.
"""

from ._cli_process import CliSupervisor, open_cli_supervisor
from ._ports import free_port_range
from ._procs import alive, read_pid_file, wait_pids_gone

__all__ = [
    "CliSupervisor",
    "alive",
    "free_port_range",
    "open_cli_supervisor",
    "read_pid_file",
    "wait_pids_gone",
]
