"""The settings' vocabulary: enums whose values are the strings the CLI, the config file and
/status use. They stand on the floor of the package, below every family that reads a setting."""

from __future__ import annotations

import enum

__all__ = ["WILDCARD_HOSTS", "LogFormat", "RankScheme", "RestartPolicy", "RestartScope"]

#: Hosts that mean "every interface": a rank bound there is probed on loopback, here, and
#: cannot be told to a router.
WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class LogFormat(enum.Enum):
    """How our records and the ranks' lines are written."""

    TEXT = "text"  # our records as text; rank lines as they are, with a [rank N] prefix
    JSON = "json"  # every line one JSON object: ours and every rank's


class RankScheme(enum.Enum):
    """How ranks serve their health path."""

    HTTP = "http"
    HTTPS = "https"


class RestartPolicy(enum.Enum):
    NEVER = "never"  # any rank failure stops everything (DP+EP: one dead rank stalls all)
    #: Restart a rank that exited when nobody asked it to, with any status (0 included:
    #: vLLM exits 0 on SIGTERM, so an operator's ``kill -TERM`` of one rank is a bounce),
    #: failed its probes, stalled, or did not come back within the startup timeout.
    ON_FAILURE = "on-failure"
    #: Deprecated (a FutureWarning when a config is built with it, which then holds
    #: ON_FAILURE): it meant on-failure since every unrequested exit, status 0 included,
    #: became a failure. Kept so that configurations that name it still load.
    ALWAYS = "always"


class RestartScope(enum.Enum):
    RANK = "rank"  # restart only the failed rank
    ALL = "all"  # restart every rank
