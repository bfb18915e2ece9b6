"""The group across nodes: which member this supervisor is, how many there are, and which
members it watches, from --group-peer or from LeaderWorkerSet's environment.

Under LeaderWorkerSet every pod is given the leader's address, the group's size and its own
index, and nothing else (kubernetes-sigs/lws,
site/content/en/docs/reference/labels-annotations-and-environment-variables.md, "Environment
Variables": ``LWS_LEADER_ADDRESS`` "the address of the leader via the headless service",
``LWS_GROUP_SIZE`` "the size of the LWS group", ``LWS_WORKER_INDEX`` "the index or identity
of the pod within the group", 0 for the leader; the same names are the constants
LwsLeaderAddress, LwsGroupSize and LwsWorkerIndex of api/leaderworkerset/v1/
leaderworkerset_types.go). So the members form a star through the leader: each worker
watches the leader (at the leader's --control-port, the same as ours: one template), and
the leader answers every worker's watch and fans the verdict out in its answers. A worker
needs no other worker's name, and the leader needs none at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .._errors import ConfigError
from .config import SupervisorConfig, check_group_restarts, check_peer_url
from .options import option_name

__all__ = ["LWS_VARIABLES", "GroupPlan", "plan_group"]

#: LeaderWorkerSet's variables (see the module's docstring for where they are defined).
LWS_LEADER_ADDRESS = "LWS_LEADER_ADDRESS"
LWS_GROUP_SIZE = "LWS_GROUP_SIZE"
LWS_WORKER_INDEX = "LWS_WORKER_INDEX"
LWS_VARIABLES = (LWS_LEADER_ADDRESS, LWS_GROUP_SIZE, LWS_WORKER_INDEX)

#: The group's name when none is given and LeaderWorkerSet names none.
DEFAULT_GROUP_ID = "group"


@dataclass(frozen=True)
class GroupPlan:
    """This supervisor as one member of a group across nodes."""

    #: The group's name: words from a member of another group are ignored.
    group_id: str
    #: This member's index, 0 to `size` - 1.
    member: int
    #: Members in the group, this one included.
    size: int
    #: The control planes of the members this one watches (the others watch it).
    peers: tuple[str, ...]
    #: Where the plan came from, for messages: "--group-peer" or "LeaderWorkerSet".
    source: str


def plan_group(config: SupervisorConfig, environ: Mapping[str, str]) -> GroupPlan | None:
    """The group this supervisor is a member of, or None for a group on this node alone
    (or no group). Raises ConfigError for a partial or malformed LeaderWorkerSet
    environment, naming what is missing."""
    if not config.forms_group:
        return None
    group_id = config.group_id
    if config.group_peers or config.group_size is not None or config.group_member is not None:
        size = config.group_size or len(config.group_peers) + 1
        if size == 1:
            return None
        member = 0 if config.group_member is None else config.group_member
        return GroupPlan(
            group_id or DEFAULT_GROUP_ID, member, size, config.group_peers, "--group-peer"
        )
    present = [name for name in LWS_VARIABLES if environ.get(name)]
    if not present:
        return None
    missing = [name for name in LWS_VARIABLES if name not in present]
    if missing:
        raise ConfigError(
            f"a partial LeaderWorkerSet environment: {', '.join(present)} set but "
            f"{', '.join(missing)} not: run under LeaderWorkerSet (which sets all three), "
            f"or unset {', '.join(present)}, or name the members with "
            f"{option_name(SupervisorConfig, 'group_peers')}"
        )
    size = _whole(environ, LWS_GROUP_SIZE, 1)
    member = _whole(environ, LWS_WORKER_INDEX, 0)
    if member >= size:
        raise ConfigError(
            f"{LWS_WORKER_INDEX}={member} is not a member of a group of "
            f"{LWS_GROUP_SIZE}={size}: LeaderWorkerSet gives 0 to size-1"
        )
    if size == 1:
        return None
    check_group_restarts(config, f"LeaderWorkerSet's {LWS_GROUP_SIZE}={size}")
    leader = environ[LWS_LEADER_ADDRESS]
    peers: tuple[str, ...] = ()
    if member != 0:
        if config.control_port == 0:
            raise ConfigError(
                f"under LeaderWorkerSet a worker watches the leader at the leader's "
                f"{option_name(SupervisorConfig, 'control_port')}, which must then be a "
                "fixed port (the same in every pod), not 0"
            )
        scheme = "https" if config.ssl_certfile is not None else "http"
        host = f"[{leader}]" if ":" in leader else leader
        url = f"{scheme}://{host}:{config.control_port}"
        check_peer_url(LWS_LEADER_ADDRESS, url)
        peers = (url,)
    return GroupPlan(group_id or leader, member, size, peers, "LeaderWorkerSet")


def _whole(environ: Mapping[str, str], name: str, least: int) -> int:
    text = environ[name]
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise ConfigError(
            f"{name}={text!r} is not a whole number of at least {least}: LeaderWorkerSet "
            "sets it; do not override it"
        )
    return value
