"""Each concern's settings: a small frozen slice of `SupervisorConfig`, so that a module's
signature says what it uses (the prober reads a `ProbeSettings`, not 57 fields), as httpx
passes a `Timeout` or `Limits` rather than its client's every option.

The settings stay declared once, with their help, defaults and checks, in config.py: each
field of a concern is named as the `SupervisorConfig` field or resolved property it is read
from, and `derive` reads it so (a concern within a concern is derived in turn).
tests/test_concerns.py holds the names and the types to the declaration.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from .canary import CanaryRequest
from .config import SupervisorConfig
from .enums import WILDCARD_HOSTS, LogFormat, RankScheme, RestartPolicy, RestartScope
from .routers import RouterSpec

__all__ = [
    "AdminSettings",
    "CanarySettings",
    "CleanStartSettings",
    "DrainSettings",
    "EvidenceSettings",
    "GpuWatchSettings",
    "LogSettings",
    "PeerSettings",
    "ProbeSettings",
    "ProgressSettings",
    "PublishSettings",
    "RankAddress",
    "RankSettings",
    "RestartSettings",
    "derive",
]

T = TypeVar("T")


def derive(cls: Callable[..., T], config: SupervisorConfig) -> T:
    """The concern `cls`, each field read from `config`'s attribute of the same name."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cast(Any, cls)):
        kind = _hints(cls)[field.name]
        if dataclasses.is_dataclass(kind):
            values[field.name] = derive(cast(Callable[..., Any], kind), config)
        else:
            values[field.name] = getattr(config, field.name)
    return cls(**values)


@functools.cache
def _hints(cls: Callable[..., Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclass(frozen=True)
class RankAddress:
    """Where and how a rank answers the supervisor."""

    host: str
    rank_scheme: RankScheme
    rank_ca_certs: str | None
    health_path: str
    metrics_path: str

    def url(self, port: int, path: str | None = None) -> str:
        """The URL of the rank on `port` at `path` (its health path by default); a wildcard
        host is reached on loopback."""
        host = WILDCARD_HOSTS.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal
        return f"{self.rank_scheme.value}://{host}:{port}{path or self.health_path}"


@dataclass(frozen=True)
class ProbeSettings:
    """The health probes, and the startup they watch."""

    address: RankAddress
    probe_interval: float
    probe_timeout: float
    failure_threshold: int
    suspect_interval: float
    fail_on_status: tuple[str, ...]
    startup_timeout: float
    startup_probe_interval: float
    startup_stall_timeout: float
    progress_log_interval: float

    def fails_at_once(self, status: int) -> bool:
        """An answer with `status` fails a ready rank at once (``fail_on_status``)."""
        text = str(status)
        return any(p == text or (p[1:] == "xx" and p[0] == text[0]) for p in self.fail_on_status)


@dataclass(frozen=True)
class ProgressSettings:
    """The progress check: a busy rank whose counter does not move has stalled."""

    address: RankAddress
    progress_on: bool
    progress_learned: bool
    #: The fixed limit; None with ``auto`` (`progress_learned`).
    progress_timeout: float | None
    progress_timeout_min: float
    progress_timeout_max: float
    progress_interval: float
    progress_busy_metric: str | None
    progress_metric: str | None
    probe_timeout: float


@dataclass(frozen=True)
class CanarySettings:
    """The canary: a one-token generation sent to each idle rank (see _ranks/canary.py)."""

    address: RankAddress
    canary_on: bool
    canary_spec: CanaryRequest | None
    canary_idle: float
    canary_timeout: float
    canary_busy_metrics: tuple[str, ...]
    canary_progress_metric: str | None


@dataclass(frozen=True)
class DrainSettings:
    """A planned stop's drain: out of the routers, the delay, in flight to zero."""

    address: RankAddress
    drain_delay: float
    drain_timeout: float
    inflight_metrics: tuple[str, ...]
    router_timeout: float
    probe_timeout: float


@dataclass(frozen=True)
class EvidenceSettings:
    """What is kept of a failed rank before it is stopped."""

    evidence_dir: str | None
    evidence_keep: int
    evidence_timeout: float
    secret_options: tuple[str, ...]


@dataclass(frozen=True)
class CleanStartSettings:
    """What a restart waits for: the rank's port, its previous process's GPU memory."""

    host: str
    port_wait: float
    gpu_release_wait: float
    require_clean_gpus: bool


@dataclass(frozen=True)
class LogSettings:
    """The log relay: the ranks' lines, prefixed or as JSON, and their files."""

    log_prefix: bool
    log_format: LogFormat
    log_dir: str | None
    log_max_bytes: int
    log_backups: int


@dataclass(frozen=True)
class RestartSettings:
    """The restart policy."""

    restart: RestartPolicy
    scope: RestartScope
    max_restarts: int
    restart_window: float
    restart_backoff_min: float
    restart_backoff_max: float


@dataclass(frozen=True)
class GpuWatchSettings:
    """The GPU watch: readings, placement checks, faults."""

    gpu_interval: float


@dataclass(frozen=True)
class AdminSettings:
    """The operator's actions (the admin socket)."""

    forms_group: bool
    #: What makes the ranks a group, for messages (see `SupervisorConfig.group_reason`).
    group_reason: str
    startup_timeout: float
    restart_window: float
    router_timeout: float
    drain_delay: float
    drain_timeout: float


@dataclass(frozen=True)
class RankSettings:
    """What the rank tasks read, by concern (`_ranks.context.RankContext.settings`)."""

    probes: ProbeSettings
    progress: ProgressSettings
    canary: CanarySettings
    drain: DrainSettings
    evidence: EvidenceSettings
    clean_start: CleanStartSettings
    logs: LogSettings
    restarts: RestartSettings
    gpu_watch: GpuWatchSettings


@dataclass(frozen=True)
class PublishSettings:
    """How the ranks are made known: /ranks, Prometheus discovery, the routers."""

    advertised_host: str
    rank_scheme: RankScheme
    metrics_path: str
    routers: tuple[str, ...]
    router_specs: tuple[RouterSpec, ...]
    router_timeout: float


@dataclass(frozen=True)
class PeerSettings:
    """The watch between the members of a group across nodes (`_plane.peers`)."""

    peer_timeout: float
    startup_timeout: float
    peer_ca_certs: str | None
    peer_certfile: str | None
    peer_keyfile: str | None
