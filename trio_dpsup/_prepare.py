"""Everything one run is made of before its first task starts: NVML, the rank plan, the
start checks, and what is bound or made (the log directory, the cgroups, the control and
admin sockets), then the board and the trees.

Bad input found here is a ConfigError with nothing started and nothing left open: what was
made is undone in reverse order when a later step refuses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import trio

from ._config.concerns import CleanStartSettings, derive
from ._config.config import SupervisorConfig
from ._config.enums import WILDCARD_HOSTS
from ._config.group import GroupPlan, plan_group
from ._config.options import option_name
from ._config.plan import RankPlan, plan_ranks
from ._config.presets import data_parallel_size
from ._config.tls import check_tls
from ._errors import ConfigError
from ._gpu.nvml import NvmlFactory
from ._gpu.session import NvmlSession, open_nvml
from ._output.log_files import DIR_MODE as LOG_DIR_MODE
from ._output.private_dir import open_private_dir
from ._plane.admin_socket import AdminSocket, bind_admin_socket
from ._plane.control import bind_control_socket
from ._proc.cgroup import CgroupError, RunCgroups
from ._proc.membership import Trees
from ._proc.owners import Owner, OwnerKind
from ._ranks.clean_start import check_gpus_at_start, check_ports_at_start
from ._ranks.evidence import EVIDENCE_DIR_MODE
from ._state.board import Board

__all__ = ["RunParts", "prepare_run"]

# The run's own records keep the logger name they had before the split (the README shows it).
logger = logging.getLogger("trio_dpsup._supervisor")


@dataclass(frozen=True)
class RunParts:
    """What `prepare_run` made; the run owns it and closes each part when it ends."""

    board: Board
    trees: Trees
    #: NVML and the devices it sees; None when it is unavailable (the board says why).
    gpu: NvmlSession | None
    cgroups: RunCgroups | None
    #: The descriptor of --log-dir, checked; the log pump takes it over.
    log_dir: int | None
    #: The descriptor of --evidence-dir, checked; every evidence folder is made through it.
    evidence_dir: int | None
    control_sock: socket.socket
    admin_sock: AdminSocket | None

    async def aclose(self) -> None:
        """Remove the cgroups (empty once every rank tree is gone), close the evidence
        directory and NVML. The sockets belong to their servers by now, the log directory
        to the pump.

        **Cancellation**: shielded (NVML's close).
        """
        if self.evidence_dir is not None:
            os.close(self.evidence_dir)
        if self.cgroups is not None:
            self.cgroups.remove()
        if self.gpu is not None:
            await self.gpu.aclose()


async def prepare_run(
    config: SupervisorConfig, environ: Mapping[str, str], nvml: NvmlFactory, *, subreaper: bool
) -> RunParts:
    """Make the parts of one run. Raises ConfigError (nothing left made or open) for bad
    input, a taken port or GPU, an unusable log directory or socket path.

    **Cancellation**: what was made is undone; NVML is closed, shielded.
    """
    gpu, problem = await open_nvml(nvml)
    with contextlib.ExitStack() as undo:
        try:
            inventory = None if gpu is None else gpu.inventory
            plans = plan_ranks(config, environ, inventory, nvml_problem=problem)
            # Nothing of this run exists yet: every holder of a port or a GPU is foreign.
            check_ports_at_start(plans, config.host, _nobody_of_ours)
            if gpu is not None:
                clean_start = derive(CleanStartSettings, config)
                await check_gpus_at_start(clean_start, gpu.backend, plans, _nobody_of_ours)
            check_tls(config)
            # Before anything listens: a log directory that is unsafe or cannot be made
            # is bad input (exit 2), not a failure after the control plane answered.
            log_dir = _open_dir(config, "log_dir", LOG_DIR_MODE)
            if log_dir is not None:
                undo.callback(os.close, log_dir)
            evidence_dir = _open_dir(config, "evidence_dir", EVIDENCE_DIR_MODE)
            if evidence_dir is not None:
                undo.callback(os.close, evidence_dir)
            run_id = uuid.uuid4().hex
            cgroups = _make_cgroups(run_id) if config.cgroups else None
            if cgroups is not None:
                undo.callback(cgroups.remove)
            group = plan_group(config, environ)
            sock = bind_control_socket(config.control_host, config.control_port)
            undo.callback(sock.close)
            if group is not None:
                await _check_not_self(group, sock)
            admin_sock = None
            if config.admin_socket is not None:
                admin_sock = bind_admin_socket(config.admin_socket)
                undo.callback(admin_sock.remove)
                undo.callback(admin_sock.sock.close)
        except BaseException:
            if gpu is not None:
                await gpu.aclose()
            raise
        undo.pop_all()  # the run owns them now
    for plan in plans:
        logger.info(
            "rank %d command: %s",
            plan.rank,
            shlex.join(plan.redacted_argv),
            extra={"rank": plan.rank},
        )
    _say_where_the_rest_run(config, plans)
    # Names the run in /status and marks every process of its trees (see _proc/cookie.py).
    board = Board(
        plans,
        run_id,
        nvml_unavailable=problem,
        min_ready=config.min_ready,
        group=config.forms_group,
        routers=tuple(str(spec) for spec in config.router_specs),
        members=None if group is None else (group, config.member_node),
    )
    trees = Trees(run_id, adopter=os.getpid() if subreaper else None)
    if cgroups is not None:
        trees.use_cgroups()
    return RunParts(board, trees, gpu, cgroups, log_dir, evidence_dir, sock, admin_sock)


def _nobody_of_ours(pid: int) -> Owner:
    return Owner(OwnerKind.OUTSIDE)


def _open_dir(
    config: SupervisorConfig, field: Literal["log_dir", "evidence_dir"], mode: int
) -> int | None:
    """The descriptor of the directory setting `field` names, checked (private_dir.py), or
    None where it is not set. (The config refuses --log-dir without the log prefix.)"""
    path = getattr(config, field)
    if path is None:
        return None
    return open_private_dir(path, option_name(SupervisorConfig, field), mode)


def _make_cgroups(run_id: str) -> RunCgroups:
    try:
        return RunCgroups.create(run_id)
    except CgroupError as exc:
        raise ConfigError(
            f"--cgroups needs a writable cgroup v2 hierarchy, and {exc}: run under systemd "
            "with Delegate=yes, in a privileged container, or without --cgroups"
        ) from exc


def _say_where_the_rest_run(config: SupervisorConfig, plans: tuple[RankPlan, ...]) -> None:
    """A data-parallel size (in the command, under a preset) larger than the ranks here:
    say which ranks this node runs and that the others are expected from other nodes, so
    that ``-dp 8`` on a 4-GPU node is no surprise."""
    size = data_parallel_size(config.preset, config.command)
    first, last = plans[0].rank, plans[-1].rank
    if size is None or (first == 0 and last + 1 >= size):
        return
    logger.info(
        "ranks %d-%d of the data-parallel group of %d run here; the others are expected "
        "from other nodes (--start-rank, --ranks)",
        first,
        last,
        size,
    )


#: The longest the check of a peer's name may take (a name not yet known is not ours).
_RESOLVE_TIMEOUT = 2.0


async def _check_not_self(group: GroupPlan, sock: socket.socket) -> None:
    """Raise ConfigError for a peer URL that is this member's own control plane: it would
    watch itself and count itself as another member."""
    host, port = sock.getsockname()[:2]
    for url in group.peers:
        parts = urlsplit(url)
        if parts.port != port or parts.hostname is None:
            continue
        addresses: set[str] = set()
        with trio.move_on_after(_RESOLVE_TIMEOUT):
            try:
                infos = await trio.socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
            except OSError:
                infos = []  # not resolvable (yet): another member's name, still starting
            addresses = {str(info[4][0]) for info in infos}
        if any(address == host or (host in WILDCARD_HOSTS and _is_local(address))
               for address in addresses):  # fmt: skip
            shown = f"[{host}]" if ":" in host else host
            raise ConfigError(
                f"{group.source} {url} is this member's own control plane ({shown}:{port}): "
                "give the other members' control planes, not this one's"
            )


def _is_local(address: str) -> bool:
    """Whether `address` is one of this machine's (a socket can be bound to it)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True
