"""SupervisorConfig: every setting of a supervisor, validated when it is built.

Validation is eager: a bad value raises `ConfigError` from the constructor, with a message
that names the option and what to change, so nothing is ever started from a bad config.
Checks that need the environment (devices, PATH) happen when the rank plan is made.
"""

from __future__ import annotations

import os
import re
import socket
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .._errors import ConfigError
from .._output.redact import redact_text
from .canary import CanaryRequest, not_generating, parse_canary_request, preset_canary
from .enums import WILDCARD_HOSTS, LogFormat, RankScheme, RestartPolicy, RestartScope
from .options import (
    at_least_one,
    check_settings,
    check_types,
    creatable_directory,
    interval,
    interval_or_zero,
    option_name,
    positive_seconds,
    seconds_or_auto,
    seconds_or_zero,
    setting,
    writable_directory_of,
    zero_or_more,
)
from .presets import (
    INFLIGHT_METRICS,
    PROGRESS_METRICS,
    Preset,
    data_parallel_size,
    parallel_size,
)
from .routers import RouterSpec, check_routers, parse_router

__all__ = ["SupervisorConfig"]

MAX_PORT = 65535

#: How often a rank that is not yet ready is probed. Readiness must be seen within tens of
#: milliseconds of the last rank answering 200; 50 ms keeps the median delay near 25 ms while
#: costing one refused connection per rank every 50 ms during a load that lasts minutes.
DEFAULT_STARTUP_PROBE_INTERVAL = 0.05


@dataclass(frozen=True, kw_only=True)
class SupervisorConfig:
    """What to run and how to watch it. Field names match the CLI options (``--base-port``).

    `command` is a template: ``{rank}``, ``{local_rank}``, ``{port}``, ``{host}``, ``{gpus}``
    and ``{ranks}`` are filled in per rank (``{{`` and ``}}`` stand for literal braces).
    """

    command: tuple[str, ...]
    # -- ranks
    ranks: int | None = setting(
        None, "local ranks (default: devices / gpus-per-rank)", "ranks", "N", check=at_least_one,
    )  # fmt: skip
    start_rank: int = setting(0, "global rank of local rank 0", "ranks", "N", check=zero_or_more)
    #: None: with a preset, the command's tensor x pipeline parallel size; else 1. Resolved
    #: when the config is built: read `gpus`.
    gpus_per_rank: int | None = setting(
        None,
        "devices per rank, e.g. TP x PP; 0: no GPU (default: with --preset, the command's "
        "TP x PP; else 1)",
        "ranks", "N",
    )  # fmt: skip
    #: None: the environment's CUDA_VISIBLE_DEVICES when set, else every device NVML sees.
    devices: tuple[str, ...] | None = setting(
        None,
        "comma list of devices to hand out: indices, GPU-… or MIG-… UUIDs "
        "(default: CUDA_VISIBLE_DEVICES, else all NVML devices)",
        "ranks", "LIST",
    )  # fmt: skip
    gpu_interval: float = setting(
        5.0,
        "seconds between GPU readings and placement checks",
        "ranks",
        "SECONDS",
        check=interval,
    )
    preset: Preset | None = setting(
        None,
        "adapt the command to vLLM (vllm serve ...), SGLang (python -m "
        "sglang.launch_server ...) or llama.cpp (llama-server ...): adds --host, --port (and "
        "vLLM's --data-parallel-rank, llama.cpp's --metrics) per rank, checks the parallel "
        "sizes, and sets the progress metrics",
        "ranks",
    )
    host: str = setting(
        "127.0.0.1", "host the ranks listen on, for {host} and probes", "ranks", "HOST"
    )
    base_port: int = setting(8000, "port of local rank 0; rank i gets base+i", "ranks", "PORT")
    # -- control plane
    control_host: str = setting(
        "127.0.0.1",
        "where the control plane listens (0.0.0.0 for probes from outside: a kubelet)",
        "control plane", "HOST",
    )  # fmt: skip
    #: 0 binds any free port; the bound address is in `SupervisorHandle.control_url`.
    control_port: int = setting(9000, "0 for any free port", "control plane", "PORT")
    admin_socket: str | None = setting(
        None,
        "serve operator actions (trio-dpsup ctl: status, restart, drain, pause-probes, "
        "rolling-restart) on this Unix socket, mode 0600, never on TCP",
        "control plane", "PATH", check=writable_directory_of,
    )  # fmt: skip
    ssl_certfile: str | None = setting(
        None, "serve the control plane over HTTPS: PEM chain", "control plane", "PATH"
    )
    ssl_keyfile: str | None = setting(
        None, "the private key of --ssl-certfile (PEM)", "control plane", "PATH"
    )
    ssl_ca_certs: str | None = setting(
        None, "require client certificates signed by this CA (mutual TLS)", "control plane", "PATH"
    )
    # -- health probes
    health_path: str = setting(
        "/health", "the path each rank answers 200 on once it serves", "health probes", "PATH"
    )
    rank_scheme: RankScheme = setting(
        RankScheme.HTTP, "how ranks serve the health path", "health probes"
    )
    #: Without it, HTTPS ranks on loopback are not verified (they hold self-signed
    #: certificates), others against the system's CAs.
    rank_ca_certs: str | None = setting(
        None,
        "verify HTTPS ranks against this CA bundle (default: not on loopback, else the "
        "system's CAs)",
        "health probes", "PATH",
    )  # fmt: skip
    probe_interval: float = setting(
        1.0,
        "seconds between probes of a ready rank",
        "health probes",
        "SECONDS",
        check=interval,
    )
    probe_timeout: float = setting(
        2.0, "how long one probe may take before it counts as failed", "health probes",
        "SECONDS", check=positive_seconds,
    )  # fmt: skip
    failure_threshold: int = setting(
        3, "consecutive failures that fail a ready rank", "health probes", "N", check=at_least_one
    )
    suspect_interval: float = setting(
        0.03,
        "after a ready rank's first failed probe, the spacing of the probes that confirm "
        "or clear it (as Envoy's unhealthy_edge_interval)",
        "health probes", "SECONDS", check=interval,
    )  # fmt: skip
    #: Empty with --preset vllm: vLLM's /health answers 503 only when its engine is dead.
    fail_on_status: tuple[str, ...] = setting(
        (),
        "an answer with this status (503, or a class such as 5xx) fails a ready rank at "
        "once, with no threshold (repeatable; default with --preset vllm: 503)",
        "health probes", "STATUS", flag="--fail-on-status",
    )  # fmt: skip
    startup_timeout: float = setting(
        1800.0,
        "seconds for every rank to become ready; 0: no limit",
        "health probes",
        "SECONDS",
        check=seconds_or_zero,
    )
    startup_stall_timeout: float = setting(
        0.0,
        "a starting rank that shows no work moving toward ready for this long fails before "
        "--startup-timeout: no bytes read from storage by its processes (/proc/PID/io), no "
        "growth of its GPUs' memory (NVML), no output line; CPU time alone is not progress "
        "(a collective that waits spins); 0: off",
        "health probes", "SECONDS", check=seconds_or_zero,
    )  # fmt: skip
    #: How often a rank that is not ready yet is probed (no CLI option).
    startup_probe_interval: float = DEFAULT_STARTUP_PROBE_INTERVAL
    # -- progress (hang detection beyond /health)
    #: None: auto, learned per rank, where the metrics are known (a preset, or both names
    #: given); resolved to 0.0 (off) where they are not. Read `progress_on` and
    #: `progress_learned`.
    progress_timeout: float | None = setting(
        None,
        "a ready rank that is busy (--progress-busy-metric > 0) while --progress-metric does "
        "not advance for this long has stalled, and fails; auto: learned per rank from its "
        "own gaps between progress while busy (3 x their 99th percentile, within "
        "--progress-timeout-min and --progress-timeout-max; 120 s until 20 gaps are seen); "
        "0: off (default: auto where the metrics are known: a preset, or "
        "--progress-busy-metric and --progress-metric; else off)",
        "progress", "SECONDS|auto", check=seconds_or_zero, parse=seconds_or_auto,
        show_default=False,
    )  # fmt: skip
    progress_timeout_min: float = setting(
        30.0,
        "with --progress-timeout auto: the shortest limit learned; keep it above the longest "
        "single engine step you expect (one prefill batch)",
        "progress", "SECONDS", check=positive_seconds,
    )  # fmt: skip
    progress_timeout_max: float = setting(
        600.0, "with --progress-timeout auto: the longest limit learned", "progress", "SECONDS",
        check=positive_seconds,
    )  # fmt: skip
    progress_interval: float = setting(
        5.0,
        "seconds between reads of each ready rank's metrics",
        "progress", "SECONDS",
        check=interval,
    )  # fmt: skip
    #: None: the preset's (vLLM's vllm:num_requests_running, SGLang's sglang:num_running_reqs).
    progress_busy_metric: str | None = setting(
        None,
        "a gauge on the rank's metrics that is above 0 while it has work (default: the "
        "preset's)",
        "progress", "NAME",
    )  # fmt: skip
    #: None: the preset's (vllm:generation_tokens_total, sglang:generation_tokens_total).
    progress_metric: str | None = setting(
        None,
        "a counter on the rank's metrics that grows while it makes progress, e.g. generated "
        "tokens (default: the preset's)",
        "progress", "NAME",
    )  # fmt: skip
    metrics_path: str = setting(
        "/metrics", "where each rank serves its Prometheus metrics", "progress", "PATH"
    )
    # -- canary (generation proven on idle ranks; see _config/canary.py)
    #: None: on with a preset that knows a request and a model that generates, or with
    #: --canary-request. Resolved when the config is built.
    canary: bool | None = setting(
        None,
        "send each ready rank that is idle (its in-flight gauge reads 0 and its progress "
        "counter has not moved for --canary-idle) a one-token generation, never one to a "
        "busy rank; a failure is confirmed by one more at once, and two in a row fail the "
        "rank (default: on with --preset when the model generates, or with "
        "--canary-request)",
        "canary",
    )
    canary_idle: float = setting(
        10.0,
        "how long a rank stays idle before a canary is sent: one canary per idle rank this "
        "often",
        "canary", "SECONDS", check=positive_seconds,
    )  # fmt: skip
    canary_timeout: float = setting(
        10.0, "how long a canary may take before it counts as failed", "canary", "SECONDS",
        check=positive_seconds,
    )  # fmt: skip
    canary_request: tuple[str, ...] = setting(
        (),
        "the canary for a server no preset knows: METHOD (GET or POST), PATH and a JSON "
        "body, e.g. POST /v1/completions '{\"model\": \"m\", \"prompt\": \"Hi\", "
        "\"max_tokens\": 1}'",
        "canary", "METHOD PATH JSON", nargs=3, show_default=False,
    )  # fmt: skip
    # -- restarts
    restart: RestartPolicy = setting(
        RestartPolicy.NEVER,
        "never: any rank failure stops everything (DP+EP); on-failure: restart a rank that "
        "exited unasked (any status, 0 included), failed its probes or stalled; always: "
        "deprecated, the same as on-failure",
        "restarts",
    )
    #: None: all for a group (`forms_group`), rank for independent replicas. Resolved when
    #: the config is built.
    restart_scope: RestartScope | None = setting(
        None,
        "restart only the failed rank, or all ranks (default: all for a group, else rank)",
        "restarts",
    )
    #: The ranks form one group that cannot take back one restarted rank (a data-parallel
    #: group: vLLM's --data-parallel-size, MoE). Also set by --preset vllm with
    #: --data-parallel-size in the command: read `forms_group`.
    group: bool = setting(
        False,
        "the ranks form one group that cannot take back one restarted rank (a data-"
        "parallel group): a restart restarts them all, /ready needs every rank, and "
        "per-rank restarts, drains and --min-ready below the rank count are refused "
        "(default: on with --preset vllm and --data-parallel-size in the command)",
        "restarts",
    )
    max_restarts: int = setting(
        3,
        "more restarts than this within --restart-window stop everything",
        "restarts",
        "N",
        check=zero_or_more,
    )
    restart_window: float = setting(
        60.0, "the window --max-restarts counts restarts in", "restarts", "SECONDS",
        check=positive_seconds,
    )  # fmt: skip
    restart_backoff_min: float = setting(
        1.0,
        "seconds before a rank's first restart; doubles per restart",
        "restarts",
        "SECONDS",
        check=positive_seconds,
    )
    restart_backoff_max: float = setting(
        30.0, "the longest wait before a restart", "restarts", "SECONDS", check=positive_seconds
    )
    port_wait: float = setting(
        30.0,
        "how long a restarting rank waits for its port to be released by the process "
        "holding it (named in the log and /status)",
        "restarts", "SECONDS", check=seconds_or_zero,
    )  # fmt: skip
    gpu_release_wait: float = setting(
        60.0,
        "with NVML: how long a restarting rank waits for its previous process's GPU memory "
        "to be released before it starts again",
        "restarts", "SECONDS", check=seconds_or_zero,
    )  # fmt: skip
    require_clean_gpus: bool = setting(
        False,
        "with NVML: processes outside this run holding memory on a rank's GPUs are a usage "
        "error at start (exit 2) and a failure at a restart, not a warning",
        "restarts",
    )
    #: Once every rank has been ready once.
    min_ready: int | None = setting(
        None, "/ready answers 200 while this many ranks are ready (default: all ranks)",
        "restarts", "N", check=at_least_one,
    )  # fmt: skip
    # -- drain and routers: a planned stop takes the rank out, then waits for its requests
    drain_delay: float = setting(
        0.0,
        "before a planned stop (ctl drain, restart, rolling-restart; SIGTERM), how long a "
        "rank stays up once it is out of /ranks, its /ranks/{r}/ready and every --router, "
        "before its in-flight requests are awaited: a pull-based balancer's check interval "
        "x fall count",
        "drain and routers", "SECONDS", check=seconds_or_zero,
    )  # fmt: skip
    drain_timeout: float = setting(
        30.0,
        "the longest a planned stop waits, after --drain-delay, for the rank's in-flight "
        "gauge (--inflight-metric) to read 0 before it signals the rank anyway",
        "drain and routers", "SECONDS", check=seconds_or_zero,
    )  # fmt: skip
    #: Empty: the preset's (presets.INFLIGHT_METRICS); none without a preset. Resolved when
    #: the config is built.
    inflight_metrics: tuple[str, ...] = setting(
        (),
        "a gauge on the rank's metrics that counts its requests in flight; several are "
        "summed (repeatable; default: the preset's, e.g. llamacpp:requests_processing and "
        "llamacpp:requests_deferred; none: a drain waits --drain-delay only)",
        "drain and routers", "NAME", flag="--inflight-metric",
    )  # fmt: skip
    routers: tuple[str, ...] = setting(
        (),
        "register each rank with this router once it serves, and take it out before any "
        "planned stop and at a failure (repeatable; kinds: sglang, e.g. "
        "sglang=http://127.0.0.1:30000)",
        "drain and routers", "KIND=URL", flag="--router", check=check_routers,
    )  # fmt: skip
    router_timeout: float = setting(
        2.0,
        "how long to wait for a router's own listing to confirm a rank added or removed, "
        "before going on (its health checks remain)",
        "drain and routers", "SECONDS", check=positive_seconds,
    )  # fmt: skip
    #: None: `host`. Resolved when the config is built: read `advertised_host`.
    advertise_host: str | None = setting(
        None,
        "the host in the rank URLs given to routers (default: --host; needed when --host is "
        "a wildcard address)",
        "drain and routers", "HOST",
    )  # fmt: skip
    # -- across nodes: a group whose members (one supervisor per node) fail as one
    group_peers: tuple[str, ...] = setting(
        (),
        "another member of the group: its control plane's URL (http[s]://HOST:PORT); this "
        "member watches it and answers its watch, and a failure of either stops both "
        "(repeatable; needs --group; default under LeaderWorkerSet: workers watch the "
        "leader, LWS_LEADER_ADDRESS at our --control-port)",
        "across nodes", "URL", flag="--group-peer",
    )  # fmt: skip
    #: None: the --group-peer count + 1, or LWS_GROUP_SIZE (see `_config/group.py`).
    group_size: int | None = setting(
        None,
        "members in the group, this one included (default: --group-peer count + 1; under "
        "LeaderWorkerSet: LWS_GROUP_SIZE)",
        "across nodes", "N", check=at_least_one,
    )  # fmt: skip
    #: None: 0 with no --group-peer (the hub), else required; LWS_WORKER_INDEX under LWS.
    group_member: int | None = setting(
        None,
        "this member's index, 0 to size-1 (named in every member's failure message; "
        "required with --group-peer; under LeaderWorkerSet: LWS_WORKER_INDEX)",
        "across nodes", "N", check=zero_or_more,
    )  # fmt: skip
    group_id: str | None = setting(
        None,
        "the group's name: an answer or a report from a member of another group is ignored "
        "(default: under LeaderWorkerSet, LWS_LEADER_ADDRESS; else 'group')",
        "across nodes", "NAME",
    )  # fmt: skip
    peer_timeout: float = setting(
        5.0,
        "a member not heard from for this long (its supervisor gone, its node cut off) "
        "fails the group; members are asked at least three times within it",
        "across nodes", "SECONDS", check=positive_seconds,
    )  # fmt: skip
    peer_ca_certs: str | None = setting(
        None,
        "verify members' HTTPS control planes against this CA bundle (default: the "
        "system's CAs)",
        "across nodes", "PATH",
    )  # fmt: skip
    peer_certfile: str | None = setting(
        None,
        "the client certificate (PEM chain) this member shows to members whose control "
        "plane asks for one (their --ssl-ca-certs: mutual TLS)",
        "across nodes", "PATH",
    )  # fmt: skip
    peer_keyfile: str | None = setting(
        None, "the private key of --peer-certfile (PEM)", "across nodes", "PATH"
    )
    # -- shutdown
    grace_period: float = setting(
        20.0,
        "seconds between the forwarded signal and SIGKILL",
        "shutdown",
        "SECONDS",
        check=positive_seconds,
    )
    cgroups: bool = setting(
        False,
        "put each rank in a cgroup v2 of its own and kill by cgroup: nothing a rank starts "
        "can leave it (needs a writable cgroup v2: systemd Delegate=yes, a privileged "
        "container)",
        "shutdown",
    )
    tree_watch_interval: float = setting(
        1.0,
        "seconds between walks of the rank trees that record their members for the "
        "guardian and reap adopted orphans",
        "shutdown", "SECONDS", check=interval,
    )  # fmt: skip
    fail_on_leftovers: bool = setting(
        False,
        "exit 1 when processes still hold memory on the ranks' GPUs after shutdown",
        "shutdown",
    )
    evidence_dir: str | None = setting(
        None,
        "before a failed rank that is still running is stopped, write its Python stacks "
        "(py-spy), last log lines and status under this directory, one folder per failure",
        "shutdown", "DIR", check=creatable_directory,
    )  # fmt: skip
    evidence_keep: int = setting(
        100,
        "keep at most this many evidence folders in --evidence-dir (of every run), the "
        "oldest removed first (about 0.4 MB each); 0: keep them all",
        "shutdown", "N", check=zero_or_more,
    )  # fmt: skip
    evidence_timeout: float = setting(
        5.0,
        "the longest the failed rank's own stop waits for its evidence (other ranks never "
        "wait)",
        "shutdown", "SECONDS", check=seconds_or_zero,
    )  # fmt: skip
    status_file: str | None = setting(
        None,
        "on exit, write the final /status document (JSON: the failure, each rank's exit "
        "status and last causes) to this file, replacing it atomically",
        "shutdown", "PATH", check=writable_directory_of,
    )  # fmt: skip
    # -- logs
    #: False: ranks inherit our stdout and stderr.
    log_prefix: bool = setting(
        True,
        "let ranks write straight to our stdout and stderr, instead of line by line with a "
        "[rank N] prefix",
        "logs", flag="--no-log-prefix",
    )  # fmt: skip
    log_format: LogFormat = setting(
        LogFormat.TEXT,
        "text, or json: every line we write becomes one JSON object, the ranks' own lines "
        "too (time, rank, stream, message)",
        "logs",
    )
    log_dir: str | None = setting(
        None,
        "also write each rank's lines, both streams as it wrote them (JSON objects with "
        "--log-format json), to DIR/rank-R.log, R its global rank; rotated by size",
        "logs", "DIR", check=creatable_directory,
    )  # fmt: skip
    log_max_bytes: int = setting(
        100 * 2**20,
        "with --log-dir: a rank's file is rotated before it passes this size (rank-R.log.1 "
        "is the newest of the old ones)",
        "logs", "BYTES", check=at_least_one,
    )  # fmt: skip
    log_backups: int = setting(
        5, "with --log-dir: old files kept per rank (0: the file starts over)", "logs", "N",
        check=zero_or_more,
    )  # fmt: skip
    progress_log_interval: float = setting(
        30.0,
        "while ranks start, log how many are ready and which are awaited this often, so "
        "that a long model load shows it is moving (kubectl logs); 0: never",
        "logs", "SECONDS", check=interval_or_zero,
    )  # fmt: skip
    secret_options: tuple[str, ...] = setting(
        (),
        "an option of the rank command whose value is secret, besides those found by name "
        "or shape (e.g. --secret-option=-k); shown as *** in /status and logs (repeatable)",
        "logs", "OPTION", flag="--secret-option",
    )  # fmt: skip
    #: Extra environment for every rank, applied before the per-rank variables.
    env: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        self._coerce_enums()
        if not self.command:
            raise ConfigError("no command to run: put the rank command after '--'")
        check_types(self)  # before any check reads a value as its declared type
        check_settings(self)  # each option's own check, declared with it
        if self.restart_scope is None:
            scope = RestartScope.ALL if self.forms_group else RestartScope.RANK
            object.__setattr__(self, "restart_scope", scope)  # frozen: set once, here
        if self.gpus_per_rank is None:
            derived = 1 if self.preset is None else parallel_size(self.preset, self.command)
            object.__setattr__(self, "gpus_per_rank", derived)  # frozen: set once, here
        if self.gpus < 0:
            raise ConfigError(
                f"{_opt('gpus_per_rank')} must be 0 (ranks without GPUs) or more, "
                f"not {self.gpus_per_rank}"
            )
        interval(_opt("startup_probe_interval"), self.startup_probe_interval)
        path = _opt("health_path")
        # Shown redacted: a path can carry a token (/health?token=X).
        shown = redact_text(self.health_path)
        if not self.health_path.startswith("/"):
            raise ConfigError(f"{path} must start with '/', e.g. /{shown}")
        if not re.fullmatch(r"/[\x21-\x7e]{0,1000}", self.health_path):
            raise ConfigError(
                f"{path} {shown!r} must be a URL path of visible ASCII "
                "characters, with no spaces or control characters: e.g. /health"
            )
        if self.devices is not None:
            check_unique_devices(self.devices, f"in {_opt('devices')}")
        self._check_tls()
        self._check_restarts()
        self._check_ports()
        self._check_progress()
        self._check_drain()
        self._check_group_peers()
        self._check_canary()
        stall, deadline = self.startup_stall_timeout, self.startup_timeout
        if stall and deadline and stall >= deadline:
            raise ConfigError(
                f"{_opt('startup_stall_timeout')} {stall:g} is not below "
                f"{_opt('startup_timeout')} {deadline:g}, so it could never fire: lower it"
            )
        if self.log_dir is not None and not self.log_prefix:
            raise ConfigError(
                f"{_opt('log_dir')} needs the ranks' lines to pass through the supervisor, "
                f"which {_opt('log_prefix')} turns off: drop one"
            )
        if self.log_format is LogFormat.JSON and not self.log_prefix:
            raise ConfigError(
                f"{_opt('log_format')} json turns every rank line into JSON, which ranks "
                f"writing straight to our output ({_opt('log_prefix')}) cannot be: drop one"
            )
        self._check_fail_on_status()

    @property
    def scope(self) -> RestartScope:
        """The restart scope, resolved (see `restart_scope`)."""
        assert self.restart_scope is not None  # resolved in __post_init__
        return self.restart_scope

    @property
    def forms_group(self) -> bool:
        """Whether the ranks form one group (``group``, or a preset's data-parallel size
        in the command) rather than independent replicas."""
        return self.group or data_parallel_size(self.preset, self.command) is not None

    @property
    def group_reason(self) -> str:
        """What makes the ranks a group, for messages."""
        size = data_parallel_size(self.preset, self.command)
        if size is not None:
            return (
                f"--data-parallel-size {size} in the command makes the ranks one vLLM "
                "data-parallel group"
            )
        return f"{_opt('group')} makes the ranks one group"

    @property
    def gpus(self) -> int:
        """Devices per rank, resolved (see `gpus_per_rank`)."""
        assert self.gpus_per_rank is not None  # resolved in __post_init__
        return self.gpus_per_rank

    def _coerce_enums(self) -> None:
        """Accept an enum setting as its member or its value (``restart="never"``), as the
        CLI does; anything else is a ConfigError naming the allowed values. Without this a
        library caller's string would be compared against the enum and silently misread."""
        for name, cls in (
            ("restart", RestartPolicy),
            ("restart_scope", RestartScope),
            ("preset", Preset),
            ("rank_scheme", RankScheme),
            ("log_format", LogFormat),
        ):
            value = getattr(self, name)
            if value is None and name in ("preset", "restart_scope"):
                continue
            if isinstance(value, cls):
                continue
            try:
                member = cls(value)
            except ValueError:
                allowed = ", ".join(str(m.value) for m in cls)
                raise ConfigError(f"{_opt(name)} must be one of {allowed}, not {value!r}") from None
            object.__setattr__(self, name, member)  # frozen: set once, while constructing

    def _check_restarts(self) -> None:
        if self.restart is RestartPolicy.ALWAYS:
            # It meant on-failure since on-failure restarts an exit with status 0 too; a
            # user-facing warning (FutureWarning: shown by default), then the one meaning.
            warnings.warn(
                f"{_opt('restart')} always is the same as on-failure and will be removed: "
                f"pass {_opt('restart')} on-failure",
                FutureWarning,
                stacklevel=4,
            )
            object.__setattr__(self, "restart", RestartPolicy.ON_FAILURE)  # frozen: set once
        if self.restart_backoff_max < self.restart_backoff_min:
            raise ConfigError(
                f"{_opt('restart_backoff_max')} {self.restart_backoff_max:g} is below "
                f"{_opt('restart_backoff_min')} {self.restart_backoff_min:g}: raise it"
            )
        if (
            self.forms_group
            and self.restart is not RestartPolicy.NEVER
            and self.restart_scope is RestartScope.RANK
        ):
            raise ConfigError(
                f"{_opt('restart_scope')} rank: {self.group_reason}, which cannot take back "
                f"one restarted rank: drop {_opt('restart_scope')} (a group restarts as one), "
                f"or pass {_opt('restart')} never"
            )
        if self.ranks is not None:  # otherwise once the rank count is known (plan_ranks)
            check_min_ready(self, self.ranks)

    def _check_tls(self) -> None:
        cert, key, ca = _opt("ssl_certfile"), _opt("ssl_keyfile"), _opt("ssl_ca_certs")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ConfigError(f"{cert} and {key} go together: pass both, or neither")
        if self.ssl_ca_certs is not None and self.ssl_certfile is None:
            raise ConfigError(
                f"{ca} verifies clients of an HTTPS control plane: pass {cert} and {key} too"
            )
        if self.rank_ca_certs is not None and self.rank_scheme is not RankScheme.HTTPS:
            raise ConfigError(
                f"{_opt('rank_ca_certs')} verifies HTTPS ranks: pass {_opt('rank_scheme')} https"
            )
        for name in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs", "rank_ca_certs"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{_opt(name)} {path} is not a file: give the path of a PEM file")

    def _check_ports(self) -> None:
        if not 1 <= self.base_port <= MAX_PORT:
            raise ConfigError(
                f"{_opt('base_port')} must be within 1-{MAX_PORT}, not {self.base_port}"
            )
        if not 0 <= self.control_port <= MAX_PORT:
            raise ConfigError(
                f"{_opt('control_port')} must be within 1-{MAX_PORT} (or 0 for any free port), "
                f"not {self.control_port}"
            )
        if self.ranks is None:
            return  # the rank count, and so the port range, is known once devices are
        check_port_range(self, self.ranks)

    def _check_fail_on_status(self) -> None:
        for pattern in self.fail_on_status:
            if not re.fullmatch(r"[1-5](\d\d|xx)", pattern):
                raise ConfigError(
                    f"{_opt('fail_on_status')} {pattern!r}: give a status such as 503, or a "
                    "class such as 5xx"
                )
        if self.preset is Preset.SGLANG and self.probe_timeout <= 1.0:
            # SGLang's /health (python/sglang/srt/entrypoints/http_server.py) sleeps a second
            # before it looks for the answer to its one-token generation: never faster.
            raise ConfigError(
                f"--preset sglang: {_opt('probe_timeout')} {self.probe_timeout:g} would fail "
                "every probe: SGLang's /health answers after at least 1 second; give more than 1"
            )
        if not self.fail_on_status and self.preset is Preset.VLLM:
            # vLLM's /health (vllm/entrypoints/serve/instrumentator/health.py) answers 503
            # only on EngineDeadError: a dead engine, which no later probe will see alive.
            object.__setattr__(self, "fail_on_status", ("503",))  # frozen: set once, here

    def _check_progress(self) -> None:
        """With the progress check on, both metric names must be known: given, or the
        preset's (filled in here, so everything downstream reads them from the config)."""
        if not self.metrics_path.startswith("/"):
            raise ConfigError(f"{_opt('metrics_path')} must start with '/', e.g. /metrics")
        if self.progress_timeout_min > self.progress_timeout_max:
            raise ConfigError(
                f"{_opt('progress_timeout_min')} {self.progress_timeout_min:g} is above "
                f"{_opt('progress_timeout_max')} {self.progress_timeout_max:g}: lower it"
            )
        if self.progress_timeout == 0:
            return
        busy, progress = (None, None)
        if self.preset is not None:
            busy, progress = PROGRESS_METRICS[self.preset]
        if self.progress_timeout is None and (
            (self.progress_busy_metric or busy) is None
            or (self.progress_metric or progress) is None
            or (self.preset is Preset.SGLANG and "--enable-metrics" not in self.command)
        ):
            # auto, with nothing to learn from: off (SGLang serves no metrics without it).
            object.__setattr__(self, "progress_timeout", 0.0)  # frozen: set once, here
            return
        for name, default in (("progress_busy_metric", busy), ("progress_metric", progress)):
            if getattr(self, name) is None:
                if default is None:
                    raise ConfigError(
                        f"{_opt('progress_timeout')} needs {_opt(name)}: name the metric on "
                        f"the ranks' {self.metrics_path}, or pass {_opt('preset')} "
                        "vllm|sglang|llama-cpp"
                    )
                object.__setattr__(self, name, default)  # frozen: set once, while constructing

    def _check_drain(self) -> None:
        """The in-flight gauges (the preset's when none is given, filled in here) and the
        routers' rank URLs."""
        if not self.inflight_metrics and self.preset is not None:
            object.__setattr__(self, "inflight_metrics", INFLIGHT_METRICS[self.preset])
        if self.routers and self.advertise_host is None and self.host in WILDCARD_HOSTS:
            raise ConfigError(
                f"{_opt('routers')} needs an address routers can reach each rank at, and "
                f"{_opt('host')} {self.host!r} is a wildcard: pass {_opt('advertise_host')} "
                "with this node's address (in Kubernetes, the pod IP: $(POD_IP))"
            )
        if self.advertise_host is not None and (
            not self.advertise_host or self.advertise_host in WILDCARD_HOSTS
        ):
            raise ConfigError(
                f"{_opt('advertise_host')} {self.advertise_host!r} is not an address a "
                "router can reach: give this node's address or name"
            )

    def _check_group_peers(self) -> None:
        """The members' options: each needs --group, every URL is a control plane's, the
        member's index is within the size. What comes from the environment (LeaderWorkerSet)
        and what this member binds are checked when the run is planned (group.py)."""
        peer, size, member = _opt("group_peers"), _opt("group_size"), _opt("group_member")
        given = [
            _opt(name)
            for name in ("group_peers", "group_size", "group_member", "group_id")
            if getattr(self, name) not in (None, ())
        ]
        if given and not self.forms_group:
            raise ConfigError(
                f"{', '.join(given)} {'makes' if len(given) == 1 else 'make'} this supervisor "
                "one member of a group across "
                f"nodes, and its ranks are not a group: pass {_opt('group')} (or drop "
                f"{', '.join(given)})"
            )
        for url in self.group_peers:
            check_peer_url(peer, url)
        if len(set(self.group_peers)) != len(self.group_peers):
            raise ConfigError(f"{peer}: a member is listed twice: list each member once")
        if self.group_peers and self.group_member is None:
            raise ConfigError(
                f"{peer} needs {member}: this member's index in the group (0 to size-1), "
                "named in the failure messages of every member"
            )
        members = self.group_size or len(self.group_peers) + 1
        if members > 1:
            check_group_restarts(self, f"{peer} (or {size})")
        if len(self.group_peers) >= members:
            raise ConfigError(
                f"{size} {members} leaves no room for this member and its "
                f"{len(self.group_peers)} {peer}(s): raise {size} or list fewer peers"
            )
        if self.group_member is not None and self.group_member >= members:
            raise ConfigError(
                f"{member} {self.group_member} is not a member of a group of {members}: "
                f"give 0 to {members - 1}, or raise {size}"
            )
        if self.group_id is not None and not re.fullmatch(r"[\x21-\x7e]{1,200}", self.group_id):
            raise ConfigError(
                f"{_opt('group_id')} {self.group_id!r}: give a name of 1 to 200 visible ASCII "
                "characters"
            )
        cert, key = _opt("peer_certfile"), _opt("peer_keyfile")
        if (self.peer_certfile is None) != (self.peer_keyfile is None):
            raise ConfigError(f"{cert} and {key} go together: pass both, or neither")
        for name in ("peer_ca_certs", "peer_certfile", "peer_keyfile"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{_opt(name)} {path} is not a file: give the path of a PEM file")

    @property
    def member_node(self) -> str:
        """How this member names its node to the others (in their failure messages): the
        control plane's address, else --advertise-host, else the host's name (a pod's)."""
        if self.control_host not in WILDCARD_HOSTS:
            return self.control_host
        return self.advertise_host or socket.gethostname()

    def _check_canary(self) -> None:
        """Resolve `canary` (on, off); with it on, a request and the gauges that tell an
        idle rank must be known."""
        option = _opt("canary")
        request = self.canary_spec  # a bad --canary-request is refused, on or off
        if self.canary is False:
            return
        explicit = self.canary is True or bool(self.canary_request)
        why_not = None
        if request is None:
            why_not = (
                f"{option} needs a request: pass {_opt('canary_request')} METHOD PATH JSON, "
                f"or {_opt('preset')} vllm|sglang|llama-cpp (vLLM's needs the model in the "
                "command)"
            )
        elif not self.canary_request and self.preset is not None:
            flag = not_generating(self.preset, self.command)
            if flag is not None:
                why_not = (
                    f"{option}: {flag} in the command serves a model that does not generate: "
                    f"drop {option}, or give {_opt('canary_request')} METHOD PATH JSON"
                )
            elif self.preset is Preset.SGLANG and "--enable-metrics" not in self.command:
                why_not = (
                    f"{option} with --preset sglang: SGLang serves the gauge that tells an idle "
                    "rank only with --enable-metrics: add it to the command, or pass "
                    f"--no-{option[2:]}"
                )
        if why_not is None and (not self.canary_busy_metrics or not self.canary_progress_metric):
            why_not = (
                f"{option} sends canaries only to idle ranks, told by a busy gauge and a "
                f"progress counter on the ranks' {self.metrics_path}: pass "
                f"{_opt('progress_busy_metric')} and {_opt('progress_metric')}, or "
                f"{_opt('preset')} vllm|sglang|llama-cpp"
            )
        if why_not is not None and explicit:
            raise ConfigError(why_not)
        object.__setattr__(self, "canary", why_not is None)  # frozen: set once, here

    @property
    def progress_on(self) -> bool:
        """Whether the progress check runs, resolved (see `progress_timeout`)."""
        return self.progress_timeout != 0

    @property
    def progress_learned(self) -> bool:
        """Whether each rank's progress limit is learned (``--progress-timeout auto``)."""
        return self.progress_timeout is None

    @property
    def canary_on(self) -> bool:
        """Whether canaries are sent, resolved (see `canary`)."""
        return bool(self.canary)

    @property
    def canary_spec(self) -> CanaryRequest | None:
        """The canary's request: ``--canary-request``'s, else the preset's; None if neither."""
        if self.canary_request:
            return parse_canary_request(_opt("canary_request"), self.canary_request)
        if self.preset is None:
            return None
        return preset_canary(self.preset, self.command)

    @property
    def canary_busy_metrics(self) -> tuple[str, ...]:
        """The gauges that read 0 on an idle rank: the in-flight gauges (running and
        queued), else the progress check's busy gauge, else the preset's."""
        if self.inflight_metrics:
            return self.inflight_metrics
        if self.progress_busy_metric is not None:
            return (self.progress_busy_metric,)
        return () if self.preset is None else (PROGRESS_METRICS[self.preset][0],)

    @property
    def canary_progress_metric(self) -> str | None:
        """The counter that stays still on an idle rank: the progress check's, else the
        preset's."""
        if self.progress_metric is not None:
            return self.progress_metric
        return None if self.preset is None else PROGRESS_METRICS[self.preset][1]

    @property
    def router_specs(self) -> tuple[RouterSpec, ...]:
        """The routers to feed, parsed (each was checked when the config was built)."""
        return tuple(parse_router(_opt("routers"), text) for text in self.routers)

    @property
    def advertised_host(self) -> str:
        """The host in the rank URLs given to routers."""
        return self.host if self.advertise_host is None else self.advertise_host


def _opt(name: str) -> str:
    """The option that sets field `name`, as users spell it: messages name what to change."""
    return option_name(SupervisorConfig, name)


def check_port_range(config: SupervisorConfig, ranks: int) -> None:
    """Raise ConfigError unless ports base..base+ranks-1 are valid and exclude the control port."""
    last = config.base_port + ranks - 1
    if ranks > MAX_PORT:
        raise ConfigError(
            f"{ranks} ranks need {ranks} ports, more than there are ({MAX_PORT}): "
            f"lower {_opt('ranks')}"
        )
    if last > MAX_PORT:
        raise ConfigError(
            f"rank ports {config.base_port}-{last} go past {MAX_PORT}: "
            f"lower {_opt('base_port')} to {MAX_PORT - ranks + 1} or less"
        )
    if config.base_port <= config.control_port <= last:
        raise ConfigError(
            f"{_opt('control_port')} {config.control_port} is inside the rank ports "
            f"{config.base_port}-{last}: choose a control port outside that range"
        )
    ours = {config.host, config.advertised_host, "localhost", *WILDCARD_HOSTS.values()}
    for router in config.router_specs:
        if router.host in ours and config.base_port <= router.port <= last:
            raise ConfigError(
                f"{_opt('routers')} {router}: port {router.port} is a rank's (the rank "
                f"ports are {config.base_port}-{last}): give the router's own port"
            )


def check_min_ready(config: SupervisorConfig, ranks: int) -> None:
    """Raise ConfigError if --min-ready asks for more ranks than there are, or, for a
    group, for fewer: a group serves whole or not at all."""
    if config.min_ready is not None and config.min_ready > ranks:
        raise ConfigError(
            f"{_opt('min_ready')} {config.min_ready} is more than the {ranks} ranks: lower it"
        )
    if config.forms_group and config.min_ready is not None and config.min_ready < ranks:
        raise ConfigError(
            f"{_opt('min_ready')} {config.min_ready}: {config.group_reason}, which serves "
            f"whole or not at all: drop {_opt('min_ready')} (/ready then needs all {ranks}), "
            "or run the ranks as independent replicas"
        )


def check_group(config: SupervisorConfig, ranks: int) -> None:
    """A data-parallel group larger than this node's ranks spans nodes: restarting this
    node's part cannot rejoin it, so it must exit and be recreated whole."""
    size = data_parallel_size(config.preset, config.command)
    if size is None or size <= ranks or config.restart is RestartPolicy.NEVER:
        return
    raise ConfigError(
        f"{_opt('restart')} {config.restart.value}: the data-parallel group "
        f"(--data-parallel-size {size}) spans more than these {ranks} ranks, and a part "
        f"restarted on one node cannot rejoin it: pass {_opt('restart')} never; the "
        "supervisor then exits non-zero and LeaderWorkerSet's RecreateGroupOnPodRestart "
        "recreates the whole group (deploy/kubernetes/leaderworkerset.yaml)"
    )


def check_group_restarts(config: SupervisorConfig, spanned_by: str) -> None:
    """A group whose members are on several nodes (`spanned_by` says how it was told so)
    is recreated whole, never restarted in part: refuse a restart policy."""
    if config.restart is RestartPolicy.NEVER:
        return
    raise ConfigError(
        f"{_opt('restart')} {config.restart.value}: {spanned_by} makes this node one member "
        "of a group across nodes, and ranks restarted on one node cannot rejoin it: pass "
        f"{_opt('restart')} never; a failure then stops every member, and LeaderWorkerSet's "
        "RecreateGroupOnPodRestart (or your orchestrator) recreates the whole group "
        "(docs/across-nodes.md)"
    )


def check_unique_devices(devices: Sequence[str], where: str) -> None:
    """Raise ConfigError for an empty or repeated device; `where` says where they were listed
    ("in --devices", "in CUDA_VISIBLE_DEVICES")."""
    seen: set[str] = set()
    for device in devices:
        if not device:
            raise ConfigError(f"an empty device entry {where}: write e.g. 0,1,2,3")
        if device in seen:
            raise ConfigError(f"device {device} is listed twice {where}: list each device once")
        seen.add(device)


def check_peer_url(option: str, url: str) -> None:
    """Raise ConfigError unless `url` is a member's control plane: http(s)://HOST:PORT."""
    shown = redact_text(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{option} {shown!r}: {exc}: give http(s)://HOST:PORT") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(
            f"{option} {shown!r} is not an http or https URL: give the member's control "
            "plane, e.g. http://10.0.0.2:9000"
        )
    if not parts.hostname or port is None:
        raise ConfigError(
            f"{option} {shown!r} needs a host and the member's --control-port, e.g. "
            f"{parts.scheme}://10.0.0.2:9000"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(
            f"{option} {shown!r}: give only the scheme, host and port of the member's "
            f"control plane, e.g. {parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"
        )
