"""The harness's settings, typed: every `SupervisorConfig` field but those the harness sets
itself (``command``, ``ranks``), as keywords that a type checker holds to their types.

`SupervisorConfig` stays the one declaration: a test (tests/test_house.py) fails when a
field is added, removed or retyped there and not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from .._config.enums import LogFormat, RankScheme, RestartPolicy, RestartScope
    from .._config.presets import Preset

__all__ = ["SupervisorSettings"]


class SupervisorSettings(TypedDict, total=False):
    """``Harness.start(2, grace_period=3)``: each key is the `SupervisorConfig` field of
    the same name (its help is the CLI option's: ``python -m trio_dpsup --help``)."""

    start_rank: int
    gpus_per_rank: int | None
    devices: tuple[str, ...] | None
    gpu_interval: float
    preset: Preset | None
    host: str
    base_port: int
    control_host: str
    control_port: int
    admin_socket: str | None
    ssl_certfile: str | None
    ssl_keyfile: str | None
    ssl_ca_certs: str | None
    health_path: str
    rank_scheme: RankScheme
    rank_ca_certs: str | None
    probe_interval: float
    probe_timeout: float
    failure_threshold: int
    suspect_interval: float
    fail_on_status: tuple[str, ...]
    startup_timeout: float
    startup_probe_interval: float
    startup_stall_timeout: float
    progress_timeout: float | None
    progress_timeout_min: float
    progress_timeout_max: float
    progress_interval: float
    progress_busy_metric: str | None
    progress_metric: str | None
    metrics_path: str
    canary: bool | None
    canary_idle: float
    canary_timeout: float
    canary_request: tuple[str, ...]
    restart: RestartPolicy
    restart_scope: RestartScope | None
    group: bool
    max_restarts: int
    restart_window: float
    restart_backoff_min: float
    restart_backoff_max: float
    port_wait: float
    gpu_release_wait: float
    require_clean_gpus: bool
    min_ready: int | None
    drain_delay: float
    drain_timeout: float
    inflight_metrics: tuple[str, ...]
    routers: tuple[str, ...]
    router_timeout: float
    advertise_host: str | None
    group_peers: tuple[str, ...]
    group_size: int | None
    group_member: int | None
    group_id: str | None
    peer_timeout: float
    peer_ca_certs: str | None
    peer_certfile: str | None
    peer_keyfile: str | None
    grace_period: float
    cgroups: bool
    tree_watch_interval: float
    fail_on_leftovers: bool
    evidence_dir: str | None
    evidence_keep: int
    evidence_timeout: float
    status_file: str | None
    log_prefix: bool
    log_format: LogFormat
    log_dir: str | None
    log_max_bytes: int
    log_backups: int
    progress_log_interval: float
    secret_options: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
