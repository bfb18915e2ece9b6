"""The command line: ``trio-dpsup [options] -- COMMAND [ARGS...]``.

The CLI owns what the library leaves to its caller: signal handling (the first SIGTERM or
SIGINT starts the ordered shutdown and is forwarded to the ranks, a second one kills them
at once), logging setup, becoming a child subreaper, and the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from typing import NoReturn, TypeVar

import trio

from ._config import SupervisorConfig
from ._config_file import load_config_file
from ._errors import EXIT_USAGE, ConfigError, SupervisorFailure
from ._log_format import configure_logging
from ._plan import PLACEHOLDERS
from ._presets import Preset
from ._restart import RestartPolicy, RestartScope
from ._spawn import become_subreaper
from ._supervisor import Supervisor, SupervisorHandle
from ._systemd import run_systemd_notify

__all__ = ["main", "run_cli"]

logger = logging.getLogger("trio_dpsup")

PROG = "trio-dpsup"
E = TypeVar("E", bound=BaseException)
_DEFAULTS = SupervisorConfig(command=("unused",))


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point: run the CLI and exit with its status."""
    sys.exit(run_cli(sys.argv[1:] if argv is None else argv))


def run_cli(argv: Sequence[str]) -> int:
    """Parse `argv`, supervise, and return the exit status (2 for bad input)."""
    parser = build_parser()
    options, command = _split_command(argv)
    try:
        # The file's values become defaults, so that options on the command line win.
        config_file = parser.parse_known_args(options)[0].config
        if config_file is not None:
            defaults, file_command = load_config_file(config_file, parser._actions)
            parser.set_defaults(**defaults)
            command = command or file_command or []
    except ConfigError as exc:
        return _usage_error(exc)
    args = parser.parse_args(options)  # exits 2 itself on a malformed option
    configure_logging(args.log_level, args.log_format)
    _raise_fd_limit()
    try:
        config = _config_from_args(args, command)
    except ConfigError as exc:
        return _usage_error(exc)
    return trio.run(_supervise, config)


#: The help's closing paragraphs, after the placeholders.
_EPILOG = (
    "Devices: --devices, else CUDA_VISIBLE_DEVICES, else every GPU NVML sees, is split into "
    "groups of --gpus-per-rank; each rank gets CUDA_VISIBLE_DEVICES set to its own group (and "
    "CUDA_DEVICE_ORDER=PCI_BUS_ID for indices, so CUDA numbers GPUs as NVML does). Devices are "
    "indices, GPU UUIDs or MIG UUIDs; an empty or -1 CUDA_VISIBLE_DEVICES means none. "
    "--gpus-per-rank 0 runs ranks without GPUs. With no devices known (no NVML), --ranks is "
    "required.",
    "Exit status: 0 after a requested shutdown in which every rank stopped within the grace "
    "period; the first failing rank's status (128+N for signal N); 1 for a probe failure, a "
    "startup timeout, a GPU fault, a rank that had to be killed, or (with --fail-on-leftovers) "
    "GPU memory left held; 2 for bad input.",
)


def build_parser() -> argparse.ArgumentParser:
    placeholders = "\n".join(f"  {{{name}}}  {text}" for name, text in PLACEHOLDERS.items())
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [options] -- COMMAND [ARGS...]",
        description=(
            "Start one HTTP server per data-parallel rank, watch them, serve a control plane "
            "for probes, and tear everything down in order on a signal or the first failure."
        ),
        epilog="\n\n".join(
            [
                "COMMAND and ARGS are templates; these placeholders are filled in per rank:\n"
                + placeholders,
                *(textwrap.fill(paragraph, 79) for paragraph in _EPILOG),
            ]
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = _DEFAULTS
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        help="read options from a TOML file (keys: the long options; command line wins)",
    )
    ranks = parser.add_argument_group("ranks")
    ranks.add_argument("--ranks", type=int, help="local ranks (default: devices / gpus-per-rank)")
    ranks.add_argument(
        "--start-rank",
        type=int,
        default=d.start_rank,
        help="global rank of local rank 0 (default: %(default)s)",
    )
    ranks.add_argument(
        "--gpus-per-rank",
        type=int,
        default=d.gpus_per_rank,
        help="devices per rank, e.g. TP x PP; 0: no GPU (default: %(default)s)",
    )
    ranks.add_argument(
        "--devices",
        type=_device_list,
        help="comma list of devices to hand out: indices, GPU-… or MIG-… UUIDs "
        "(default: CUDA_VISIBLE_DEVICES, else all NVML devices)",
    )
    ranks.add_argument(
        "--gpu-interval",
        type=float,
        default=d.gpu_interval,
        help="seconds between GPU readings and placement checks (default: %(default)s)",
    )
    ranks.add_argument(
        "--preset",
        choices=[p.value for p in Preset],
        help="adapt the command to vLLM (vllm serve ...) or SGLang "
        "(python -m sglang.launch_server ...): adds --host, --port (and vLLM's "
        "--data-parallel-rank) per rank, and checks the parallel sizes",
    )
    ranks.add_argument(
        "--host",
        default=d.host,
        help="host the ranks listen on, for {host} and probes (default: %(default)s)",
    )
    ranks.add_argument(
        "--base-port",
        type=int,
        default=d.base_port,
        help="port of local rank 0; rank i gets base+i (default: %(default)s)",
    )
    control = parser.add_argument_group("control plane")
    control.add_argument("--control-host", default=d.control_host, help="(default: %(default)s)")
    control.add_argument(
        "--control-port",
        type=int,
        default=d.control_port,
        help="0 for any free port (default: %(default)s)",
    )
    control.add_argument("--ssl-certfile", help="serve the control plane over HTTPS: PEM chain")
    control.add_argument("--ssl-keyfile", help="the private key of --ssl-certfile (PEM)")
    control.add_argument(
        "--ssl-ca-certs", help="require client certificates signed by this CA (mutual TLS)"
    )
    probes = parser.add_argument_group("health probes")
    probes.add_argument("--health-path", default=d.health_path, help="(default: %(default)s)")
    probes.add_argument(
        "--rank-scheme",
        choices=["http", "https"],
        default=d.rank_scheme,
        help="how ranks serve the health path (default: %(default)s)",
    )
    probes.add_argument(
        "--rank-ca-certs",
        help="verify HTTPS ranks against this CA bundle (default: not on loopback, else the "
        "system's CAs)",
    )
    probes.add_argument(
        "--probe-interval",
        type=float,
        default=d.probe_interval,
        help="seconds between probes of a ready rank (default: %(default)s)",
    )
    probes.add_argument(
        "--probe-timeout",
        type=float,
        default=d.probe_timeout,
        help="seconds (default: %(default)s)",
    )
    probes.add_argument(
        "--failure-threshold",
        type=int,
        default=d.failure_threshold,
        help="consecutive failures that fail a ready rank (default: %(default)s)",
    )
    probes.add_argument(
        "--startup-timeout",
        type=float,
        default=d.startup_timeout,
        help="seconds for every rank to become ready; 0: no limit (default: %(default)s)",
    )
    restarts = parser.add_argument_group("restarts")
    restarts.add_argument(
        "--restart",
        choices=[p.value for p in RestartPolicy],
        default=d.restart.value,
        help="never: any rank failure stops everything (DP+EP); on-failure: restart a rank "
        "that crashed, exited non-zero or failed its probes; always: also after exit 0 "
        "(default: %(default)s)",
    )
    restarts.add_argument(
        "--restart-scope",
        choices=[s.value for s in RestartScope],
        default=d.restart_scope.value,
        help="restart only the failed rank, or all ranks (default: %(default)s)",
    )
    restarts.add_argument(
        "--max-restarts",
        type=int,
        default=d.max_restarts,
        help="more restarts than this within --restart-window stop everything "
        "(default: %(default)s)",
    )
    restarts.add_argument(
        "--restart-window",
        type=float,
        default=d.restart_window,
        help="seconds (default: %(default)s)",
    )
    restarts.add_argument(
        "--restart-backoff-min",
        type=float,
        default=d.restart_backoff_min,
        help="seconds before a rank's first restart; doubles per restart (default: %(default)s)",
    )
    restarts.add_argument(
        "--restart-backoff-max",
        type=float,
        default=d.restart_backoff_max,
        help="the longest wait before a restart (default: %(default)s)",
    )
    restarts.add_argument(
        "--min-ready",
        type=int,
        help="/ready answers 200 while this many ranks are ready (default: all ranks)",
    )
    stop = parser.add_argument_group("shutdown")
    stop.add_argument(
        "--grace-period",
        type=float,
        default=d.grace_period,
        help="seconds between the forwarded signal and SIGKILL (default: %(default)s)",
    )
    stop.add_argument(
        "--drain-delay",
        type=float,
        default=d.drain_delay,
        help="seconds to stay up, not ready, before signalling ranks (default: %(default)s)",
    )
    stop.add_argument(
        "--cgroups",
        action="store_true",
        help="put each rank in a cgroup v2 of its own and kill by cgroup: nothing a rank "
        "starts can leave it (needs a writable cgroup v2: systemd Delegate=yes, a "
        "privileged container)",
    )
    stop.add_argument(
        "--tree-watch-interval",
        type=float,
        default=d.tree_watch_interval,
        help="seconds between walks of the rank trees that record their members for the "
        "guardian and reap adopted orphans (default: %(default)s)",
    )
    stop.add_argument(
        "--fail-on-leftovers",
        action="store_true",
        help="exit 1 when processes still hold memory on the ranks' GPUs after shutdown",
    )
    logs = parser.add_argument_group("logs")
    logs.add_argument(
        "--no-log-prefix",
        dest="log_prefix",
        action="store_false",
        help="let ranks write straight to our stdout and stderr, instead of line by line "
        "with a [rank N] prefix",
    )
    logs.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="our own records as text, or one JSON object per line (default: %(default)s)",
    )
    logs.add_argument(
        "--secret-option",
        dest="secret_options",
        action="append",
        default=[],
        metavar="OPTION",
        help="an option of the rank command whose value is secret, besides those found by "
        "name or shape (e.g. --secret-option=-k); shown as *** in /status and logs "
        "(repeatable)",
    )
    logs.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(default: %(default)s)",
    )
    return parser


def _raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard one: the soft default (often 1024) is
    a guard for programs that leak descriptors, not for one that holds a few per rank and
    one per control-plane connection. The rank count is checked against it (plan_ranks)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Options before the first ``--``, the rank command after it."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    index = argv.index("--")
    return argv[:index], argv[index + 1 :]


def _device_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(","))


def _config_from_args(args: argparse.Namespace, command: list[str]) -> SupervisorConfig:
    return SupervisorConfig(
        command=tuple(command),
        ranks=args.ranks,
        start_rank=args.start_rank,
        gpus_per_rank=args.gpus_per_rank,
        devices=args.devices,
        host=args.host,
        base_port=args.base_port,
        control_host=args.control_host,
        control_port=args.control_port,
        health_path=args.health_path,
        probe_interval=args.probe_interval,
        probe_timeout=args.probe_timeout,
        failure_threshold=args.failure_threshold,
        startup_timeout=args.startup_timeout,
        grace_period=args.grace_period,
        drain_delay=args.drain_delay,
        gpu_interval=args.gpu_interval,
        fail_on_leftovers=args.fail_on_leftovers,
        log_prefix=args.log_prefix,
        preset=None if args.preset is None else Preset(args.preset),
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        ssl_ca_certs=args.ssl_ca_certs,
        rank_scheme=args.rank_scheme,
        rank_ca_certs=args.rank_ca_certs,
        restart=RestartPolicy(args.restart),
        restart_scope=RestartScope(args.restart_scope),
        max_restarts=args.max_restarts,
        restart_window=args.restart_window,
        restart_backoff_min=args.restart_backoff_min,
        restart_backoff_max=args.restart_backoff_max,
        min_ready=args.min_ready,
        cgroups=args.cgroups,
        secret_options=tuple(args.secret_options),
        tree_watch_interval=args.tree_watch_interval,
    )


def _usage_error(exc: ConfigError) -> int:
    print(f"{PROG}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


#: The signals that ask for the ordered shutdown. SIGHUP (the terminal or session went
#: away) and SIGQUIT mean "stop" to a supervisor as much as SIGTERM does.
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: A repeated signal within this many seconds of the first is the same request: coreutils'
#: `timeout` sends SIGTERM twice a few milliseconds apart (to us, then to our group), and
#: two signals in one scheduler tick cannot be told apart anyway. Past it, "kill now".
SECOND_SIGNAL_AFTER = 0.1


async def _supervise(config: SupervisorConfig) -> int:
    # Orphaned grandchildren of ranks re-parent to us, not to init, so that they stay in
    # our tree until we have killed and reaped them.
    subreaper = become_subreaper()
    if not subreaper:
        logger.warning("could not become a child subreaper; orphans re-parent to init")
    supervisor = Supervisor(config, subreaper=subreaper)
    # Listening before anything starts: a signal while ranks are being started stops the
    # starting (the library's request_shutdown works at any time).
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_forward_signals, signals, supervisor)
                handle: SupervisorHandle = await nursery.start(supervisor.run)
                nursery.start_soon(run_systemd_notify, handle, os.environ)
                status = await handle.wait_stopped()
                nursery.cancel_scope.cancel()
                return status
        except BaseExceptionGroup as group:
            config_error = _first_leaf(group, ConfigError)
            if config_error is not None:
                return _usage_error(config_error)
            failure = _first_leaf(group, SupervisorFailure)
            if failure is not None:
                return failure.exit_status
            raise
    raise AssertionError("unreachable")  # pragma: no cover


async def _forward_signals(signals: AsyncIterator[int], supervisor: Supervisor) -> None:
    """The first signal requests the ordered shutdown (SIGINT is forwarded to ranks as
    SIGINT, the others as SIGTERM); one more, at least SECOND_SIGNAL_AFTER seconds later,
    kills the ranks now."""
    first: float | None = None
    async for signum in signals:
        name = signal.Signals(signum).name
        if first is None:
            first = trio.current_time()
            supervisor.request_shutdown(
                signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM
            )
            if signum != signal.SIGINT and signum != signal.SIGTERM:
                logger.info("%s: shutting down as for SIGTERM", name)
        elif trio.current_time() - first < SECOND_SIGNAL_AFTER:
            logger.info(
                "%s within %gs of the first signal: the same request", name, SECOND_SIGNAL_AFTER
            )
        else:
            logger.warning("second signal (%s): killing ranks now", name)
            supervisor.kill()


def _first_leaf(group: BaseExceptionGroup[BaseException], cls: type[E]) -> E | None:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_leaf(exc, cls)
            if found is not None:
                return found
        elif isinstance(exc, cls):
            return exc
    return None
