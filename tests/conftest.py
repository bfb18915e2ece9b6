"""Shared pieces of the process tests: the fake rank command and CLI arguments."""

from __future__ import annotations

import sys
from collections.abc import Sequence

FAKE_RANK = (sys.executable, "-m", "trio_dpsup.testing.fake_rank")

#: Fast probing, so that failures show in well under a second.
FAST_PROBES = (
    "--probe-interval", "0.1",
    "--probe-timeout", "0.5",
    "--failure-threshold", "2",
)  # fmt: skip


def cli_args(
    ranks: int,
    base_port: int,
    *,
    options: Sequence[str] = (),
    rank_args: Sequence[str] = (),
) -> list[str]:
    """Arguments for ``python -m trio_dpsup`` running `ranks` fake ranks on loopback."""
    return [
        "--ranks", str(ranks),
        "--host", "127.0.0.1",
        "--base-port", str(base_port),
        "--control-host", "127.0.0.1",
        "--control-port", "0",
        "--gpus-per-rank", "0",  # fake ranks need no GPU, also on a machine that has some
        "--grace-period", "5",
        *FAST_PROBES,
        *options,
        "--",
        *FAKE_RANK, "--port", "{port}",
        *rank_args,
    ]  # fmt: skip
