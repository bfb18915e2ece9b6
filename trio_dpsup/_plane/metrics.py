"""/metrics: Prometheus metrics of one supervisor, in a registry of its own.

Most values are read from the board at scrape time (a collector over `Board.snapshot`), so
nothing is kept twice; only probe latencies and failures are recorded as they happen.
Names follow Prometheus conventions: the ``trio_dpsup_`` prefix, base units (seconds, bytes,
ratios), ``_total`` for counters.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .._state.board import Board
from .._state.status import (
    CanaryResult,
    GroupStatus,
    MemberState,
    ProbeResult,
    RankState,
    SupervisorState,
)
from .._version import __version__
from .protocol import Action

__all__ = ["CONTENT_TYPE", "Metrics"]

#: The text exposition format, as prometheus-client writes it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Probe latency buckets, seconds: loopback answers take about a millisecond; the default
#: probe timeout is 2 s.
_PROBE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Canary latency buckets, seconds: a one-token generation on an idle rank takes
#: milliseconds to a second (a first prefill, a CPU model); the default timeout is 10 s.
_CANARY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The metrics of one run. `observe_probe` records a probe of a ready rank."""

    def __init__(self, board: Board) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._probe_seconds = Histogram(
            "trio_dpsup_probe_duration_seconds",
            "Health probe latency of ready ranks (timeouts count as the timeout).",
            ["rank"],
            buckets=_PROBE_BUCKETS,
            registry=self.registry,
        )
        self._probe_failures = Counter(
            "trio_dpsup_probe_failures",
            "Failed health probes of ready ranks: non-2xx, timeout, refused.",
            ["rank"],
            registry=self.registry,
        )
        self._canary_seconds = Histogram(
            "trio_dpsup_canary_duration_seconds",
            "Latency of canaries (one-token generations sent to idle ranks; failures count "
            "as the time they took).",
            ["rank"],
            buckets=_CANARY_BUCKETS,
            registry=self.registry,
        )
        self._actions = Counter(
            "trio_dpsup_admin_actions",
            "Operator actions carried out through the admin socket.",
            ["action"],
            registry=self.registry,
        )
        # Every rank's series exists from the start, at 0; a probe (every rank, every
        # interval) observes its rank's children, not a lookup of its labels each time.
        self._probe_series = {
            record.plan.rank: (
                self._probe_seconds.labels(str(record.plan.rank)),
                self._probe_failures.labels(str(record.plan.rank)),
            )
            for record in board.ranks
        }
        build = Gauge(
            "trio_dpsup_build_info",
            "1, labelled with the supervisor's version and Python's.",
            ["version", "python"],
            registry=self.registry,
        )
        build.labels(__version__, platform.python_version()).set(1)
        # The supervisor's own CPU, memory and open files (process_cpu_seconds_total...).
        ProcessCollector(registry=self.registry)
        self.registry.register(_BoardCollector(board))
        #: What /metrics serves: the registry without its ``*_created`` series.
        self._served = CollectorRegistry(auto_describe=False)
        self._served.register(_WithoutCreated(self.registry))

    def observe_probe(self, rank: int, result: ProbeResult) -> None:
        seconds, failures = self._probe_series[rank]
        seconds.observe(result.latency)
        if not result.ok:
            failures.inc()

    def observe_canary(self, rank: int, result: CanaryResult) -> None:
        self._canary_seconds.labels(str(rank)).observe(result.latency)

    def count_action(self, action: Action) -> None:
        self._actions.labels(action.value).inc()

    def render(self) -> bytes:
        return generate_latest(self._served)


class _WithoutCreated(Collector):
    """`registry`'s metrics without the ``*_created`` samples prometheus-client adds to every
    counter and histogram: a timestamp per series that dashboards do not use and that
    doubles the series a scrape stores (prometheus-client offers only a process-wide switch,
    which would reach into an embedding program's own metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class _BoardCollector(Collector):
    def __init__(self, board: Board) -> None:
        self._board = board

    def collect(self) -> Iterator[Metric]:
        board = self._board
        status = board.snapshot()
        now = trio.current_time()

        supervisor = GaugeMetricFamily(
            "trio_dpsup_state", "1 for the supervisor's current state.", labels=["state"]
        )
        for each_state in SupervisorState:
            supervisor.add_metric([each_state.value], float(status.state is each_state))
        yield supervisor
        yield GaugeMetricFamily(
            "trio_dpsup_uptime_seconds", "Seconds since the supervisor started.",
            value=now - board.started_at,
        )  # fmt: skip
        if board.ready_at is not None:
            yield GaugeMetricFamily(
                "trio_dpsup_time_to_ready_seconds",
                "Seconds from start until every rank was first ready.",
                value=board.ready_at - board.started_at,
            )

        rank_state = GaugeMetricFamily(
            "trio_dpsup_rank_state", "1 for each rank's current state.", labels=["rank", "state"]
        )
        up = GaugeMetricFamily(
            "trio_dpsup_rank_up", "1 if the rank is ready, else 0.", labels=["rank"]
        )
        restarts = CounterMetricFamily(
            "trio_dpsup_rank_restarts", "Times the rank was restarted.", labels=["rank"]
        )
        exit_status = GaugeMetricFamily(
            "trio_dpsup_rank_exit_status",
            "The rank's last exit status, kept after a restart (negative: killed by that signal).",
            labels=["rank"],
        )
        restarted = GaugeMetricFamily(
            "trio_dpsup_rank_last_restart_timestamp_seconds",
            "When the rank was last restarted (seconds since the epoch).",
            labels=["rank"],
        )
        dropped = CounterMetricFamily(
            "trio_dpsup_log_file_dropped_lines",
            "Rank lines not written to the rank's --log-dir file because its writer was "
            "behind (they were still relayed to the supervisor's output).",
            labels=["rank"],
        )
        paused = GaugeMetricFamily(
            "trio_dpsup_rank_probes_paused",
            "1 while an operator has the rank's health probes paused (ctl pause-probes).",
            labels=["rank"],
        )
        progress_limit = GaugeMetricFamily(
            "trio_dpsup_progress_limit_seconds",
            "How long the rank may be busy without progress before it has stalled: the "
            "fixed --progress-timeout, or the one learned (auto).",
            labels=["rank"],
        )
        canaries = CounterMetricFamily(
            "trio_dpsup_canaries", "Canaries sent to the rank.", labels=["rank"]
        )
        canary_failures = CounterMetricFamily(
            "trio_dpsup_canary_failures", "Canaries of the rank that failed.", labels=["rank"]
        )
        canary_off = GaugeMetricFamily(
            "trio_dpsup_canary_off",
            "1 when canaries are off for the rank: its first was refused (401, 403, 404, "
            "405), a configuration error, logged with the fix.",
            labels=["rank"],
        )
        gpu = {
            name: GaugeMetricFamily(f"trio_dpsup_gpu_{name}", text, labels=["rank", "gpu"])
            for name, text in (
                ("memory_used_bytes", "Device memory in use on the rank's GPU."),
                ("memory_total_bytes", "Device memory of the rank's GPU."),
                ("utilization_ratio", "Fraction of time the GPU was busy (0-1)."),
                ("temperature_celsius", "GPU temperature."),
                ("power_watts", "GPU power draw."),
            )
        }
        for rank in status.ranks:
            label = str(rank.rank)
            for each in RankState:
                rank_state.add_metric([label, each.value], float(rank.state is each))
            up.add_metric([label], float(rank.ready))
            paused.add_metric([label], float(rank.probes_paused_until is not None))
            restarts.add_metric([label], float(rank.restarts))
            record = board.by_rank(rank.rank)
            if record is not None and record.last_returncode is not None:
                exit_status.add_metric([label], float(record.last_returncode))
            if record is not None and record.restarted_at is not None:
                restarted.add_metric([label], record.restarted_at)
            if record is not None:
                dropped.add_metric([label], float(record.output.file_dropped_lines))
            if rank.progress is not None and rank.progress.limit is not None:
                progress_limit.add_metric([label], rank.progress.limit)
            if rank.canary is not None:
                canaries.add_metric([label], float(rank.canary.sent))
                canary_failures.add_metric([label], float(rank.canary.failed))
                canary_off.add_metric([label], float(rank.canary.off is not None))
            for sample in rank.gpu_samples:
                labels = [label, sample.uuid]
                gpu["memory_used_bytes"].add_metric(labels, float(sample.memory_used))
                gpu["memory_total_bytes"].add_metric(labels, float(sample.memory_total))
                if sample.utilization is not None:
                    gpu["utilization_ratio"].add_metric(labels, sample.utilization / 100)
                if sample.temperature is not None:
                    gpu["temperature_celsius"].add_metric(labels, float(sample.temperature))
                if sample.power is not None:
                    gpu["power_watts"].add_metric(labels, sample.power)
        yield from (rank_state, up, restarts, exit_status, restarted, dropped, paused)
        if any(rank.progress is not None for rank in status.ranks):
            yield progress_limit
        if any(rank.canary is not None for rank in status.ranks):
            yield from (canaries, canary_failures, canary_off)
        if status.routers:
            errors = CounterMetricFamily(
                "trio_dpsup_router_errors",
                "Failed exchanges with a router fed the ranks' URLs (--router); retried.",
                labels=["router"],
            )
            listed = GaugeMetricFamily(
                "trio_dpsup_router_listed_ranks",
                "Ranks the router's own listing shows registered, as last read.",
                labels=["router"],
            )
            for router in status.routers:
                errors.add_metric([router.name], float(router.errors))
                listed.add_metric([router.name], float(len(router.listed)))
            yield from (errors, listed)
        if any(rank.gpu_samples for rank in status.ranks):
            yield from gpu.values()
        if status.members is not None:
            yield from _group_metrics(status.members)


def _group_metrics(group: GroupStatus) -> Iterator[Metric]:
    """The group across nodes: each member's state, and how long ago it was heard from."""
    state = GaugeMetricFamily(
        "trio_dpsup_group_member_state",
        "1 for each member's current state, as this member last heard (this one included).",
        labels=["member", "state"],
    )
    silent = GaugeMetricFamily(
        "trio_dpsup_group_member_silence_seconds",
        "Seconds since each other member was last heard from directly (--peer-timeout bounds it).",
        labels=["member"],
    )
    now = time.time()
    for member in group.members:
        for each_state in MemberState:
            state.add_metric([str(member.member), each_state.value],
                             float(member.state is each_state))  # fmt: skip
        if member.member != group.member and member.heard is not None:
            silent.add_metric([str(member.member)], max(0.0, now - member.heard))
    yield from (state, silent)
