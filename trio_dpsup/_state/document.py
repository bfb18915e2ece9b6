"""The /status document: a `SupervisorStatus` as JSON, and back.

The control plane serves `status_to_json`; the harness reads a CLI supervisor through
`status_from_json`, so both forms of a test see the same typed status, failures included.
Failures travel as data (their kind and constructor arguments), not as text to be scraped.
Readable fields stay flat and stable (``failure`` and ``last_causes`` are the messages); the
typed forms ride beside them (``failure_detail``, ``last_cause_details``).

Memory is in whole MiB and latency in microseconds on the wire: a parsed status has those
resolutions.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from .. import _errors
from .._errors import SupervisorFailure
from .._gpu.nvml import MIB, GpuInfo, GpuSample
from .._gpu.placement import (
    GpuHolder,
    IssueKind,
    Placement,
    PlacementIssue,
    PlacementVerdict,
)
from .._proc.owners import Owner, OwnerKind, PortHolder
from .status import (
    CanaryResult,
    CanaryStatus,
    DrainEnd,
    DrainReason,
    DrainStatus,
    GroupStatus,
    MemberState,
    MemberStatus,
    ProbeResult,
    ProgressStatus,
    RankState,
    RankStatus,
    RootCause,
    RouterStatus,
    StartupProgress,
    SupervisorState,
    SupervisorStatus,
)

__all__ = [
    "failure_from_json",
    "failure_to_json",
    "rank_to_json",
    "status_from_json",
    "status_to_json",
]

JSON = dict[str, Any]

#: Every failure kind by its name on the wire.
_KINDS: dict[str, type[SupervisorFailure]] = {
    cls.__name__: cls
    for cls in vars(_errors).values()
    if isinstance(cls, type) and issubclass(cls, SupervisorFailure)
}


# -- failures -------------------------------------------------------------------------------


def failure_to_json(failure: SupervisorFailure) -> JSON:
    """``{"type": "RankExited", "message": "...", "rank": 1, "returncode": 3}``."""
    out: JSON = {"type": type(failure).__name__, "message": str(failure), "rank": failure.rank}
    for name in _parameters(type(failure)):
        out[name] = _encode(getattr(failure, name))
    return out


def failure_from_json(doc: JSON) -> SupervisorFailure:
    """The failure `failure_to_json` wrote. A kind this version does not know (a newer
    supervisor's) comes back as a plain `SupervisorFailure` with its message and rank."""
    cls = _KINDS.get(doc.get("type", ""))
    if cls is None or cls is SupervisorFailure:
        unknown = SupervisorFailure(doc["message"])
        unknown.rank = doc.get("rank")
        return unknown
    holders = {"GpuHolder": GpuHolder, "PortHolder": PortHolder}
    hints = typing.get_type_hints(cls.__init__, localns=holders)
    kwargs = {name: _decode(doc[name], hints[name]) for name in _parameters(cls)}
    return cls(**kwargs)


def _parameters(cls: type[SupervisorFailure]) -> list[str]:
    if cls is SupervisorFailure:
        return []
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def _encode(value: Any) -> Any:
    if isinstance(value, SupervisorFailure):
        return failure_to_json(value)
    if isinstance(value, GpuHolder):
        return _holder_json(value)
    if isinstance(value, PortHolder):
        return {"pid": value.pid, "command": value.command, "owner": _owner_json(value.owner)}
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any, hint: Any) -> Any:
    if hint is SupervisorFailure:
        return failure_from_json(value)
    if typing.get_origin(hint) is tuple:
        (item, _) = typing.get_args(hint)
        return tuple(_decode(v, item) for v in value)
    if hint is GpuHolder:
        return _holder_from_json(value)
    if hint is PortHolder:
        return PortHolder(value["pid"], value["command"], _owner_from_json(value["owner"]))
    return value


def _owner_json(owner: Owner) -> JSON:
    return {"kind": owner.kind.value, "rank": owner.rank, "text": owner.describe()}


def _owner_from_json(doc: JSON) -> Owner:
    return Owner(OwnerKind(doc["kind"]), doc["rank"])


def _holder_json(holder: GpuHolder) -> JSON:
    return {
        "pid": holder.pid,
        "name": holder.name,
        "owner": _owner_json(holder.owner),
        "memory_mib": holder.memory_mib,
        "gpu": holder.gpu,
    }


def _holder_from_json(doc: JSON) -> GpuHolder:
    owner = _owner_from_json(doc["owner"])
    return GpuHolder(doc["pid"], doc["name"], owner, doc["memory_mib"], doc["gpu"])


# -- the status -----------------------------------------------------------------------------


def status_to_json(status: SupervisorStatus) -> JSON:
    """The /status document: supervisor state, first failure, and one object per rank."""
    failure = status.failure
    cause = status.root_cause
    return {
        "run_id": status.run_id,
        "version": status.version,
        "state": status.state.value,
        "ready": status.ready,
        "min_ready": status.min_ready,
        "group": status.group,
        "started": status.started,
        "failure": None if failure is None else str(failure),
        "failure_detail": None if failure is None else failure_to_json(failure),
        "root_cause": None
        if cause is None
        else {
            "rank": cause.rank,
            "cause": cause.cause,
            "stderr_tail": list(cause.stderr_tail),
            "evidence": cause.evidence,
        },
        "nvml": {
            "available": status.nvml_unavailable is None,
            "problem": status.nvml_unavailable,
        },
        "ranks": [rank_to_json(r) for r in status.ranks],
        "routers": [_router_json(r) for r in status.routers],
        "members": None if status.members is None else _group_json(status.members),
    }


def status_from_json(doc: JSON) -> SupervisorStatus:
    """The `SupervisorStatus` that `doc` (a /status document) describes."""
    detail = doc.get("failure_detail")
    cause = doc["root_cause"]
    return SupervisorStatus(
        run_id=doc["run_id"],
        state=SupervisorState(doc["state"]),
        ranks=tuple(_rank_from_json(r) for r in doc["ranks"]),
        started=doc["started"],
        failure=None if detail is None else failure_from_json(detail),
        nvml_unavailable=doc["nvml"]["problem"],
        root_cause=None
        if cause is None
        else RootCause(
            cause["rank"], cause["cause"], tuple(cause["stderr_tail"]), cause.get("evidence")
        ),
        min_ready=doc["min_ready"],
        group=doc.get("group", False),
        version=doc.get("version", 0),
        routers=tuple(_router_from_json(r) for r in doc.get("routers", ())),
        members=None if doc.get("members") is None else _group_from_json(doc["members"]),
    )


def _group_json(group: GroupStatus) -> JSON:
    return {
        "group_id": group.group_id,
        "generation": group.generation,
        "member": group.member,
        "ready": group.ready,
        "members": [
            {
                "member": m.member,
                "node": m.node,
                "state": m.state.value,
                "cause": m.cause,
                "heard": m.heard,
            }
            for m in group.members
        ],
    }


def _group_from_json(doc: JSON) -> GroupStatus:
    return GroupStatus(
        group_id=doc["group_id"],
        generation=doc["generation"],
        member=doc["member"],
        members=tuple(
            MemberStatus(m["member"], m["node"], MemberState(m["state"]), m["cause"], m["heard"])
            for m in doc["members"]
        ),
    )


def rank_to_json(rank: RankStatus) -> JSON:
    probe = rank.last_probe
    return {
        "rank": rank.rank,
        "local_rank": rank.local_rank,
        "state": rank.state.value,
        "since": rank.since,
        "ready": rank.ready,
        "drained": rank.drained,
        "failing": rank.failing,
        "probes_paused_until": rank.probes_paused_until,
        "pid": rank.pid,
        "port": rank.port,
        "devices": list(rank.devices),
        "returncode": rank.returncode,
        "consecutive_failures": rank.consecutive_failures,
        "last_probe": None if probe is None else _answer_json(probe),
        "command": list(rank.command),
        "restarts": rank.restarts,
        "last_causes": [str(c) for c in rank.last_causes],
        "last_cause_details": [failure_to_json(c) for c in rank.last_causes],
        "progress": None
        if rank.progress is None
        else {
            "busy": rank.progress.busy,
            "progress": rank.progress.progress,
            "stalled_for_s": round(rank.progress.stalled_for, 3),
            "problem": rank.progress.problem,
            "limit_s": None if rank.progress.limit is None else round(rank.progress.limit, 3),
            "gaps": rank.progress.gaps,
        },
        "canary": None if rank.canary is None else _canary_json(rank.canary),
        "startup": None if rank.startup is None else _startup_json(rank.startup),
        "waiting": rank.waiting,
        "evidence": rank.evidence,
        "drain": None if rank.drain is None else _drain_json(rank.drain),
        "gpus": _gpus_json(rank),
        "placement": {
            "verdict": rank.placement.verdict.value,
            "issues": [
                {
                    "kind": issue.kind.value,
                    "gpu": issue.gpu,
                    "pid": issue.pid,
                    "owner": None if issue.owner is None else _owner_json(issue.owner),
                    "text": issue.describe(rank.rank),
                }
                for issue in rank.placement.issues
            ],
            "note": rank.placement.note,
        },
    }


def _rank_from_json(doc: JSON) -> RankStatus:
    probe = doc["last_probe"]
    gpus = tuple(
        GpuInfo(
            index=g["index"],
            uuid=g["uuid"],
            name=g["name"],
            memory_total=g["memory_total_mib"] * MIB,
            parent_uuid=g["parent_uuid"],
            mig_index=g["mig_index"],
        )
        for g in doc["gpus"]
    )
    samples = tuple(
        GpuSample(
            uuid=g["uuid"],
            memory_used=g["memory_used_mib"] * MIB,
            memory_total=g["memory_total_mib"] * MIB,
            utilization=g["utilization_pct"],
            temperature=g["temperature_c"],
            power=g["power_w"],
        )
        for g in doc["gpus"]
        if g["memory_used_mib"] is not None
    )
    placement = doc["placement"]
    return RankStatus(
        rank=doc["rank"],
        local_rank=doc["local_rank"],
        port=doc["port"],
        devices=tuple(doc["devices"]),
        state=RankState(doc["state"]),
        pid=doc["pid"],
        returncode=doc["returncode"],
        last_probe=None
        if probe is None
        else ProbeResult(
            probe["ok"], probe["status_code"], probe["error"], probe["latency_ms"] / 1000
        ),
        consecutive_failures=doc["consecutive_failures"],
        command=tuple(doc["command"]),
        gpus=gpus,
        gpu_samples=samples,
        placement=Placement(
            PlacementVerdict(placement["verdict"]),
            tuple(
                PlacementIssue(
                    IssueKind(i["kind"]),
                    i["gpu"],
                    i["pid"],
                    None if i["owner"] is None else _owner_from_json(i["owner"]),
                )
                for i in placement["issues"]
            ),
            placement["note"],
        ),
        restarts=doc["restarts"],
        last_causes=tuple(failure_from_json(c) for c in doc["last_cause_details"]),
        progress=None
        if (p := doc.get("progress")) is None
        else ProgressStatus(
            p["busy"],
            p["progress"],
            p["stalled_for_s"],
            p["problem"],
            p.get("limit_s"),
            p.get("gaps", 0),
        ),
        waiting=doc.get("waiting"),
        evidence=doc.get("evidence"),
        since=doc.get("since", 0.0),
        drained=doc.get("drained", False),
        failing=doc.get("failing", False),
        probes_paused_until=doc.get("probes_paused_until"),
        drain=None if (d := doc.get("drain")) is None else _drain_from_json(d),
        canary=None if (c := doc.get("canary")) is None else _canary_from_json(c),
        startup=None if (s := doc.get("startup")) is None else _startup_from_json(s),
    )


def _startup_json(startup: StartupProgress) -> JSON:
    return {
        "read_bytes": startup.read_bytes,
        "gpu_memory_mib": None if startup.gpu_memory is None else startup.gpu_memory // MIB,
        "lines": startup.lines,
        "last_moved": startup.last_moved,
        "last_moved_at": startup.last_moved_at,
        "still_for_s": round(startup.still_for, 3),
    }


def _startup_from_json(doc: JSON) -> StartupProgress:
    memory = doc["gpu_memory_mib"]
    return StartupProgress(
        read_bytes=doc["read_bytes"],
        gpu_memory=None if memory is None else memory * MIB,
        lines=doc["lines"],
        last_moved=doc["last_moved"],
        last_moved_at=doc["last_moved_at"],
        still_for=doc["still_for_s"],
    )


def _answer_json(answer: ProbeResult | CanaryResult) -> JSON:
    """One probe's or one canary's answer: what came back, and how long it took."""
    return {
        "ok": answer.ok,
        "status_code": answer.status_code,
        "error": answer.error,
        "latency_ms": round(answer.latency * 1000, 3),
    }


def _canary_json(canary: CanaryStatus) -> JSON:
    last = canary.last
    return {
        "sent": canary.sent,
        "failed": canary.failed,
        "off": canary.off,
        "problem": canary.problem,
        "last": None if last is None else {**_answer_json(last), "at": last.at},
    }


def _canary_from_json(doc: JSON) -> CanaryStatus:
    last = doc["last"]
    return CanaryStatus(
        sent=doc["sent"],
        failed=doc["failed"],
        off=doc["off"],
        problem=doc["problem"],
        last=None
        if last is None
        else CanaryResult(
            last["ok"], last["status_code"], last["error"], last["latency_ms"] / 1000, last["at"]
        ),
    )


def _drain_json(drain: DrainStatus) -> JSON:
    return {
        "reason": drain.reason.value,
        "began": drain.began,
        "inflight": drain.inflight,
        "end": None if drain.end is None else drain.end.value,
        "seconds": None if drain.seconds is None else round(drain.seconds, 3),
    }


def _drain_from_json(doc: JSON) -> DrainStatus:
    end = doc["end"]
    return DrainStatus(
        DrainReason(doc["reason"]),
        doc["began"],
        doc["inflight"],
        None if end is None else DrainEnd(end),
        doc["seconds"],
    )


def _router_json(router: RouterStatus) -> JSON:
    return {
        "name": router.name,
        "listed": list(router.listed),
        "problem": router.problem,
        "errors": router.errors,
    }


def _router_from_json(doc: JSON) -> RouterStatus:
    return RouterStatus(doc["name"], tuple(doc["listed"]), doc["problem"], doc["errors"])


def _gpus_json(rank: RankStatus) -> list[JSON]:
    """Each device of the rank, with its latest reading (null fields until the first)."""
    samples = {s.uuid: s for s in rank.gpu_samples}
    out = []
    for gpu in rank.gpus:
        sample = samples.get(gpu.uuid)
        out.append(
            {
                "index": gpu.index,
                "mig_index": gpu.mig_index,
                "parent_uuid": gpu.parent_uuid,
                "uuid": gpu.uuid,
                "name": gpu.name,
                "memory_total_mib": gpu.memory_total // MIB,
                "memory_used_mib": None if sample is None else sample.memory_used // MIB,
                "utilization_pct": None if sample is None else sample.utilization,
                "temperature_c": None if sample is None else sample.temperature,
                "power_w": None if sample is None else sample.power,
            }
        )
    return out
