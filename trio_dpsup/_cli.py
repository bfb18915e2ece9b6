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

from ._config.config import SupervisorConfig
from ._config.enums import LogFormat
from ._config.file import load_config_file
from ._config.options import GROUPS, add_settings, from_namespace
from ._config.plan import PLACEHOLDERS
from ._errors import EXIT_USAGE, ConfigError, SupervisorFailure
from ._output.log_format import configure_logging
from ._proc.spawn import become_subreaper
from ._proc.stop import SECOND_SIGNAL_AFTER
from ._startup_line import run_startup_line
from ._supervisor import Supervisor, SupervisorHandle
from ._systemd import run_systemd_notify
from ._version import __version__

__all__ = ["main", "run_cli"]

logger = logging.getLogger("trio_dpsup")

PROG = "trio-dpsup"
E = TypeVar("E", bound=BaseException)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point: run the CLI and exit with its status."""
    sys.exit(run_cli(sys.argv[1:] if argv is None else argv))


def run_cli(argv: Sequence[str]) -> int:
    """Parse `argv`, supervise, and return the exit status (2 for bad input).
    ``trio-dpsup ctl ...`` is the admin socket's client instead (see _plane/ctl.py)."""
    if list(argv[:1]) == ["ctl"]:
        from ._plane.ctl import run_ctl  # standard library only: a client needs nothing else

        return run_ctl(argv[1:])
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
    configure_logging(args.log_level, json_lines=LogFormat(args.log_format) is LogFormat.JSON)
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
    "stall, a startup timeout, a GPU fault, a port or GPU memory still held at a restart, a "
    "rank that had to be killed, or (with --fail-on-leftovers) GPU memory left held; 2 for bad "
    "input.",
)

#: Shown last in --help, as written.
_EXAMPLES = """Examples:
  # four demo ranks, no GPU: then curl localhost:9000/ready, Ctrl-C to stop
  trio-dpsup --ranks 4 --gpus-per-rank 0 -- python -m trio_dpsup.demo --port {port}

  # vLLM, one data-parallel group of 8 ranks, one per GPU: on any failure the group
  # restarts as one; hangs caught by progress
  trio-dpsup --preset vllm --restart on-failure --progress-timeout 120 \\
      --evidence-dir /var/log/trio-dpsup -- vllm serve MODEL --data-parallel-size 8"""


def build_parser() -> argparse.ArgumentParser:
    placeholders = "\n".join(f"  {{{name}}}  {text}" for name, text in PLACEHOLDERS.items())
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=(
            f"{PROG} [options] -- COMMAND [ARGS...]\n"
            f"       {PROG} ctl ACTION ... (see {PROG} ctl --help)"
        ),
        description=(
            "Start one HTTP server per data-parallel rank, watch them, serve a control plane "
            "for probes, and tear everything down in order on a signal or the first failure."
        ),
        epilog="\n\n".join(
            [
                "COMMAND and ARGS are templates; these placeholders are filled in per rank:\n"
                + placeholders,
                *(textwrap.fill(paragraph, 79) for paragraph in _EPILOG),
                _EXAMPLES,
            ]
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        help="read options from a TOML file (keys: the long options; command line wins)",
    )
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    add_settings(SupervisorConfig, groups)
    logs = groups["logs"]
    logs.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the least severe of the supervisor's own records to write (default: %(default)s)",
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


def _config_from_args(args: argparse.Namespace, command: list[str]) -> SupervisorConfig:
    return SupervisorConfig(command=tuple(command), **from_namespace(SupervisorConfig, args))


def _usage_error(exc: ConfigError) -> int:
    print(f"{PROG}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


#: The signals that ask for the ordered shutdown. SIGHUP (the terminal or session went
#: away) and SIGQUIT mean "stop" to a supervisor as much as SIGTERM does.
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


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
                since = trio.current_time()
                handle: SupervisorHandle = await nursery.start(supervisor.run)
                nursery.start_soon(run_systemd_notify, handle, os.environ)
                nursery.start_soon(run_startup_line, config.log_format, handle, since)
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
