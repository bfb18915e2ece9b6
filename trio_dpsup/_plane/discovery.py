"""Discovery: what routers and Prometheus read to find the ranks.

* ``GET /ranks``: a small, stable JSON document for routers (an endpoint picker, sgl-router,
  a proxy): per rank its global rank, local rank, URL, state, whether it takes traffic, and
  since when (wall clock). ``?wait=SECONDS&version=V`` answers as soon as anything changed
  after version V (a long poll, at most MAX_WAIT seconds), so a router learns of a failure
  within milliseconds without polling fast.
* ``GET /prometheus/targets``: Prometheus HTTP service discovery (``http_sd_config``): one
  target group per rank, its own metrics endpoint, labelled ``rank``, ``local_rank`` and
  ``gpus``.

Ranks bound to a wildcard host are named by this machine's host name, which is what a
router or Prometheus elsewhere can reach.
"""

from __future__ import annotations

import socket
from typing import Any

from .._config.concerns import PublishSettings
from .._config.enums import WILDCARD_HOSTS
from .._state.status import DrainReason, RankStatus, SupervisorStatus

__all__ = ["MAX_WAIT", "prometheus_targets", "ranks_document"]

#: The longest a long poll of /ranks is held.
MAX_WAIT = 60.0
#: The document's layout; a change that could break a reader bumps it.
SCHEMA = 1


def _host(config: PublishSettings) -> str:
    host = config.advertised_host
    if host in WILDCARD_HOSTS:
        host = socket.gethostname()
    return f"[{host}]" if ":" in host else host


def ranks_document(status: SupervisorStatus, config: PublishSettings) -> dict[str, Any]:
    """The /ranks document."""
    host = _host(config)
    return {
        "schema": SCHEMA,
        "run_id": status.run_id,
        "version": status.version,
        "state": status.state.value,
        "ranks": [_rank(rank, status, host, config) for rank in status.ranks],
    }


def _rank(
    rank: RankStatus, status: SupervisorStatus, host: str, config: PublishSettings
) -> dict[str, Any]:
    return {
        "rank": rank.rank,
        "local_rank": rank.local_rank,
        "url": f"{config.rank_scheme.value}://{host}:{rank.port}",
        "state": rank.state.value,
        "ready": status.takes_traffic(rank),
        "drained": rank.drained,
        # Taken out before a stop (a restart, the shutdown): its requests are finishing.
        "draining": rank.drain is not None and rank.drain.reason is not DrainReason.DRAIN,
        "since": rank.since,
    }


def prometheus_targets(status: SupervisorStatus, config: PublishSettings) -> list[Any]:
    """The http_sd_config document: a JSON list of {"targets": [...], "labels": {...}}."""
    host = _host(config)
    return [
        {
            "targets": [f"{host}:{rank.port}"],
            "labels": {
                "rank": str(rank.rank),
                "local_rank": str(rank.local_rank),
                "gpus": ",".join(rank.devices),
                "__metrics_path__": config.metrics_path,
                "__scheme__": config.rank_scheme.value,
            },
        }
        for rank in status.ranks
        # A rank drained before its stop is going away; one an operator drained still runs.
        if rank.drain is None or rank.drain.reason is DrainReason.DRAIN
    ]
