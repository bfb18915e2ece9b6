"""SupervisorConfig: every setting of a supervisor, validated when it is built.

Validation is eager: a bad value raises `ConfigError` from the constructor, with a message
that names the option and what to change, so nothing is ever started from a bad config.
Checks that need the environment (devices, PATH) happen when the rank plan is made.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from ._errors import ConfigError
from ._presets import Preset
from ._restart import RestartPolicy, RestartScope

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
    #: Local ranks. None: visible devices // gpus_per_rank (an error when no device is known).
    ranks: int | None = None
    start_rank: int = 0
    gpus_per_rank: int = 1
    #: Devices to hand out, as CUDA_VISIBLE_DEVICES entries. None: the environment's
    #: CUDA_VISIBLE_DEVICES when set, otherwise every device NVML sees.
    devices: tuple[str, ...] | None = None
    host: str = "127.0.0.1"
    base_port: int = 8000
    control_host: str = "127.0.0.1"
    #: 0 binds any free port; the bound address is in `SupervisorHandle.control_url`.
    control_port: int = 9000
    health_path: str = "/health"
    probe_interval: float = 1.0
    probe_timeout: float = 2.0
    failure_threshold: int = 3
    #: Seconds for every rank to become ready; 0 means no limit.
    startup_timeout: float = 1800.0
    grace_period: float = 20.0
    drain_delay: float = 0.0
    startup_probe_interval: float = DEFAULT_STARTUP_PROBE_INTERVAL
    #: Seconds between GPU readings and placement checks (with NVML).
    gpu_interval: float = 5.0
    #: Exit non-zero when processes still hold memory on the ranks' GPUs after shutdown.
    fail_on_leftovers: bool = False
    #: Serve the control plane over HTTPS with this certificate chain and key (PEM files).
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    #: With HTTPS: require client certificates signed by this CA bundle (mutual TLS).
    ssl_ca_certs: str | None = None
    #: How ranks serve their health path: "http" or "https".
    rank_scheme: str = "http"
    #: CA bundle to verify ranks' certificates. Without it, HTTPS ranks on loopback are not
    #: verified (they hold self-signed certificates), others against the system's CAs.
    rank_ca_certs: str | None = None
    #: Restart failed ranks instead of stopping everything (see _restart).
    restart: RestartPolicy = RestartPolicy.NEVER
    restart_scope: RestartScope = RestartScope.RANK
    #: More than this many restarts within `restart_window` seconds stop everything.
    max_restarts: int = 3
    restart_window: float = 60.0
    restart_backoff_min: float = 1.0
    restart_backoff_max: float = 30.0
    #: /ready answers 200 while at least this many ranks are ready (None: all of them),
    #: once every rank has been ready once.
    min_ready: int | None = None
    #: Adapt `command` to a known server (`Preset.VLLM`, `Preset.SGLANG`); see _presets.
    preset: Preset | None = None
    #: Relay each rank's output line by line with a ``[rank N]`` prefix; False: ranks
    #: inherit our stdout and stderr.
    log_prefix: bool = True
    #: Put each rank in a cgroup v2 of its own and kill by cgroup (see _cgroup); needs a
    #: writable cgroup v2 hierarchy.
    cgroups: bool = False
    #: Seconds between walks of the rank trees that tell the guardian of new members (and,
    #: in the CLI, reap orphans adopted from the trees).
    tree_watch_interval: float = 1.0
    #: Options of the rank command whose values are secret, besides those recognised by
    #: name or shape (see _redact): e.g. a server's short ``-k`` for its API key.
    secret_options: tuple[str, ...] = ()
    #: Extra environment for every rank, applied before the per-rank variables.
    env: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        self._coerce_enums()
        if not self.command:
            raise ConfigError("no command to run: put the rank command after '--'")
        _positive_int("--ranks", self.ranks, allow_none=True)
        if self.gpus_per_rank < 0:
            raise ConfigError(
                f"--gpus-per-rank must be 0 (ranks without GPUs) or more, not {self.gpus_per_rank}"
            )
        _positive_int("--failure-threshold", self.failure_threshold)
        if self.start_rank < 0:
            raise ConfigError(f"--start-rank must be 0 or more, not {self.start_rank}")
        for name, value in (
            ("--probe-interval", self.probe_interval),
            ("--probe-timeout", self.probe_timeout),
            ("--grace-period", self.grace_period),
            ("startup_probe_interval", self.startup_probe_interval),
            ("--gpu-interval", self.gpu_interval),
            ("--tree-watch-interval", self.tree_watch_interval),
        ):
            _positive_duration(name, value)
        for name, value in (
            ("--startup-timeout", self.startup_timeout),
            ("--drain-delay", self.drain_delay),
        ):
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be 0 or more seconds, not {value}")
        if not self.health_path.startswith("/"):
            raise ConfigError(f"--health-path must start with '/', e.g. /{self.health_path}")
        if not re.fullmatch(r"/[\x21-\x7e]{0,1000}", self.health_path):
            raise ConfigError(
                f"--health-path {self.health_path!r} must be a URL path of visible ASCII "
                "characters, with no spaces or control characters: e.g. /health"
            )
        if self.devices is not None:
            _check_devices(self.devices)
        self._check_tls()
        self._check_restarts()
        self._check_ports()

    def _coerce_enums(self) -> None:
        """Accept an enum setting as its member or its value (``restart="never"``), as the
        CLI does; anything else is a ConfigError naming the allowed values. Without this a
        library caller's string would be compared against the enum and silently misread."""
        for name, cls, option in (
            ("restart", RestartPolicy, "--restart"),
            ("restart_scope", RestartScope, "--restart-scope"),
            ("preset", Preset, "--preset"),
        ):
            value = getattr(self, name)
            if value is None and name == "preset":
                continue
            if isinstance(value, cls):
                continue
            try:
                member = cls(value)
            except ValueError:
                allowed = ", ".join(str(m.value) for m in cls)
                raise ConfigError(f"{option} must be one of {allowed}, not {value!r}") from None
            object.__setattr__(self, name, member)  # frozen: set once, while constructing

    def _check_restarts(self) -> None:
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be 0 or more, not {self.max_restarts}")
        _positive_duration("--restart-window", self.restart_window)
        _positive_duration("--restart-backoff-min", self.restart_backoff_min)
        _positive_duration("--restart-backoff-max", self.restart_backoff_max)
        if self.restart_backoff_max < self.restart_backoff_min:
            raise ConfigError(
                f"--restart-backoff-max {self.restart_backoff_max:g} is below "
                f"--restart-backoff-min {self.restart_backoff_min:g}: raise it"
            )
        _positive_int("--min-ready", self.min_ready, allow_none=True)
        if self.ranks is not None:  # otherwise once the rank count is known (plan_ranks)
            check_min_ready(self, self.ranks)

    def _check_tls(self) -> None:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ConfigError("--ssl-certfile and --ssl-keyfile go together: pass both, or neither")
        if self.ssl_ca_certs is not None and self.ssl_certfile is None:
            raise ConfigError(
                "--ssl-ca-certs verifies clients of an HTTPS control plane: pass --ssl-certfile "
                "and --ssl-keyfile too"
            )
        if self.rank_scheme not in ("http", "https"):
            raise ConfigError(f"--rank-scheme must be http or https, not {self.rank_scheme!r}")
        if self.rank_ca_certs is not None and self.rank_scheme != "https":
            raise ConfigError("--rank-ca-certs verifies HTTPS ranks: pass --rank-scheme https")
        for option, path in (
            ("--ssl-certfile", self.ssl_certfile),
            ("--ssl-keyfile", self.ssl_keyfile),
            ("--ssl-ca-certs", self.ssl_ca_certs),
            ("--rank-ca-certs", self.rank_ca_certs),
        ):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{option} {path} is not a file: give the path of a PEM file")

    def _check_ports(self) -> None:
        if not 1 <= self.base_port <= MAX_PORT:
            raise ConfigError(f"--base-port must be within 1-{MAX_PORT}, not {self.base_port}")
        if not 0 <= self.control_port <= MAX_PORT:
            raise ConfigError(
                f"--control-port must be within 1-{MAX_PORT} (or 0 for any free port), "
                f"not {self.control_port}"
            )
        if self.ranks is None:
            return  # the rank count, and so the port range, is known once devices are
        check_port_range(self, self.ranks)


def check_port_range(config: SupervisorConfig, ranks: int) -> None:
    """Raise ConfigError unless ports base..base+ranks-1 are valid and exclude the control port."""
    last = config.base_port + ranks - 1
    if ranks > MAX_PORT:
        raise ConfigError(
            f"{ranks} ranks need {ranks} ports, more than there are ({MAX_PORT}): lower --ranks"
        )
    if last > MAX_PORT:
        raise ConfigError(
            f"rank ports {config.base_port}-{last} go past {MAX_PORT}: "
            f"lower --base-port to {MAX_PORT - ranks + 1} or less"
        )
    if config.base_port <= config.control_port <= last:
        raise ConfigError(
            f"--control-port {config.control_port} is inside the rank ports "
            f"{config.base_port}-{last}: choose a control port outside that range"
        )


def check_min_ready(config: SupervisorConfig, ranks: int) -> None:
    """Raise ConfigError if --min-ready asks for more ranks than there are."""
    if config.min_ready is not None and config.min_ready > ranks:
        raise ConfigError(
            f"--min-ready {config.min_ready} is more than the {ranks} ranks: lower it"
        )


def _positive_int(name: str, value: int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise ConfigError(f"{name} must be 1 or more, not {value}")


def _positive_duration(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be more than 0 seconds, not {value}")


def _check_devices(devices: tuple[str, ...]) -> None:
    seen: set[str] = set()
    for device in devices:
        if not device:
            raise ConfigError("--devices has an empty entry: write e.g. --devices 0,1,2,3")
        if device in seen:
            raise ConfigError(
                f"device {device} is listed twice in --devices: list each device once"
            )
        seen.add(device)
