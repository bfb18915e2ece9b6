"""deploy/: the Kubernetes manifests against the Kubernetes schema (kubernetes-validate, from
PyPI, strict: unknown fields fail), and their trio-dpsup command lines against our parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from trio_dpsup import SupervisorConfig, plan_ranks

# The CLI's own parser and its config, on purpose: each manifest's command line is planned
# as the supervisor would plan it, without starting anything.
from trio_dpsup._cli import build_parser
from trio_dpsup._config.group import plan_group
from trio_dpsup._config.options import from_namespace
from trio_dpsup._plane.peers import LINGER

KUBERNETES = Path(__file__).parent.parent / "deploy" / "kubernetes"
MANIFESTS = sorted(KUBERNETES.glob("*.yaml"))
#: The LeaderWorkerSet CRD is not in the Kubernetes schema: its pod templates are checked
#: as PodTemplates, and its own fields here.
LWS = "leaderworkerset.x-k8s.io/v1"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]]
    if doc["kind"] == "LeaderWorkerSet":
        template = doc["spec"]["leaderWorkerTemplate"]
        return [template["leaderTemplate"], template["workerTemplate"]]
    return []


#: What LeaderWorkerSet sets in a worker's pod (the second of a group of two).
LWS_WORKER: dict[str, int | str] = {
    "LWS_WORKER_INDEX": 1,
    "LWS_GROUP_SIZE": 2,
    "LWS_LEADER_ADDRESS": "10.0.0.1",
}


def trio_dpsup_argv(container: dict[str, Any]) -> list[str]:
    """The arguments given to trio-dpsup (options, ``--``, the rank command), with the
    shell's arithmetic and variables filled in as in LeaderWorkerSet's worker pod."""
    command = container["command"]
    if command[:2] == ["sh", "-c"]:

        def arithmetic(match: re.Match[str]) -> str:
            term = re.fullmatch(r"(\w+) \* (\d+)", match.group(1))
            assert term is not None, f"not NAME * N: {match.group(1)}"
            name, times = term.groups()
            return str(int(LWS_WORKER[name]) * int(times))

        script = re.sub(r"\$\(\(([^)]*)\)\)", arithmetic, command[2])
        script = script.replace("$LWS_LEADER_ADDRESS", str(LWS_WORKER["LWS_LEADER_ADDRESS"]))
        command = shlex.split(script)
    argv: list[str] = command[command.index("trio-dpsup") + 1 :]
    return argv


def trio_dpsup_options(container: dict[str, Any]) -> list[str]:
    """The options given to trio-dpsup (see `trio_dpsup_argv`)."""
    argv = trio_dpsup_argv(container)
    return argv[: argv.index("--")]


def config_of(container: dict[str, Any]) -> SupervisorConfig:
    """The SupervisorConfig the container's command line builds, as the CLI builds it."""
    argv = trio_dpsup_argv(container)
    split = argv.index("--")
    args = build_parser().parse_args(argv[:split])
    return SupervisorConfig(
        command=tuple(argv[split + 1 :]), **from_namespace(SupervisorConfig, args)
    )


def test_there_are_manifests() -> None:
    assert {p.name for p in MANIFESTS} == {"replicas.yaml", "group.yaml", "leaderworkerset.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_match_the_kubernetes_schema(path: Path) -> None:
    version = kubernetes_validate.latest_version()
    for doc in documents(path):
        if doc["apiVersion"] == LWS:
            assert doc["kind"] == "LeaderWorkerSet"
            assert set(doc["spec"]) <= {"replicas", "leaderWorkerTemplate", "rolloutStrategy"}
            assert doc["spec"]["leaderWorkerTemplate"]["size"] >= 2
        else:
            kubernetes_validate.validate(doc, version, strict=True)
        for template in pod_templates(doc):
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
            kubernetes_validate.validate(
                {**pod_template, "template": template}, version, strict=True
            )


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_probes_and_grace_fit_the_supervisor(path: Path) -> None:
    templates = [t for doc in documents(path) for t in pod_templates(doc)]
    assert templates
    for template in templates:
        (container,) = template["spec"]["containers"]
        args = build_parser().parse_args(trio_dpsup_options(container))  # real options only
        control = next(p for p in container["ports"] if p["name"] == "control")
        assert control["containerPort"] == args.control_port
        assert args.control_host == "0.0.0.0"  # the kubelet probes from outside the pod
        assert container["startupProbe"]["httpGet"]["path"] == "/startupz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        startup = container["startupProbe"]
        # Clearly above: the supervisor, not the kubelet, must report a slow start.
        assert startup["periodSeconds"] * startup["failureThreshold"] >= args.startup_timeout + 60
        # Kubernetes' SIGKILL must come after the routers are told, the drain (its delay and
        # the wait for requests in flight) and the grace period.
        grace = template["spec"]["terminationGracePeriodSeconds"]
        stop = args.router_timeout + args.drain_delay + args.drain_timeout + args.grace_period
        assert grace > stop
        # The drain delay covers the readiness probe's notice of /ready 503.
        probe = container["readinessProbe"]
        assert args.drain_delay >= probe["periodSeconds"] * probe.get("failureThreshold", 3)


def test_the_schema_check_catches_a_misspelt_field() -> None:
    (deployment, *_) = documents(KUBERNETES / "replicas.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pods_are_restricted_resourced_and_get_their_secrets(path: Path) -> None:
    for template in (t for doc in documents(path) for t in pod_templates(doc)):
        pod = template["spec"]["securityContext"]
        assert (pod["runAsNonRoot"], pod["seccompProfile"]) == (True, {"type": "RuntimeDefault"})
        (container,) = template["spec"]["containers"]
        security = container["securityContext"]
        assert security == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert set(resources[kind]) == {"cpu", "memory", "nvidia.com/gpu"}
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert env["HF_HOME"]["value"].startswith("/cache")
        assert "/cache" in mounts
        # Every rank's port is a containerPort, named for the Services.
        args = build_parser().parse_args(trio_dpsup_options(container))
        ranks = args.ranks or 8
        names = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert all(names[f"rank-{i}"] == args.base_port + i for i in range(ranks))


def test_the_group_has_a_headless_service_for_its_ranks() -> None:
    (_, service, _) = documents(KUBERNETES / "leaderworkerset.yaml")
    kubernetes_validate.validate(service, kubernetes_validate.latest_version(), strict=True)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"app": "vllm-dp16"}
    assert {p["name"] for p in service["spec"]["ports"]} == {"control"} | {
        f"rank-{i}" for i in range(8)
    }


def containers_of(path: Path) -> list[dict[str, Any]]:
    return [
        container
        for doc in documents(path)
        for template in pod_templates(doc)
        for container in template["spec"]["containers"]
    ]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_command_line_plans(path: Path, fake_env: dict[str, str]) -> None:
    # The whole command line, rank command included, as the supervisor would plan it on a
    # node of eight GPUs: what it refuses (a group with --min-ready, a group across nodes
    # with restarts) fails here, not on a cluster.
    env = {**fake_env, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    for container in containers_of(path):
        config = config_of(container)
        plans = plan_ranks(config, env)
        assert len(plans) == 8


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pods_get_no_service_links_and_state_the_cache_access(path: Path) -> None:
    for doc in documents(path):
        for template in pod_templates(doc):
            # A Service named vllm-dp would inject VLLM_DP_* variables, read by vLLM.
            assert template["spec"]["enableServiceLinks"] is False
    (claim,) = [doc for doc in documents(path) if doc["kind"] == "PersistentVolumeClaim"]
    nodes = 2 if path.name == "leaderworkerset.yaml" else 1
    assert claim["spec"]["accessModes"] == (["ReadWriteMany"] if nodes > 1 else ["ReadWriteOnce"])


def test_replicas_restart_one_by_one_and_the_group_as_one() -> None:
    (replicas,) = containers_of(KUBERNETES / "replicas.yaml")
    config = config_of(replicas)
    assert not config.forms_group
    assert (config.restart.value, config.scope.value, config.min_ready) == ("on-failure", "rank", 7)
    (group,) = containers_of(KUBERNETES / "group.yaml")
    config = config_of(group)
    assert config.forms_group
    assert (config.restart.value, config.scope.value, config.min_ready) == (
        "on-failure",
        "all",
        None,
    )
    # Across nodes: no restart at all; the pod fails and LeaderWorkerSet recreates the group.
    for container in containers_of(KUBERNETES / "leaderworkerset.yaml"):
        config = config_of(container)
        assert config.forms_group
        assert config.restart.value == "never"
    (lws, *_) = documents(KUBERNETES / "leaderworkerset.yaml")
    assert lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"


def test_the_group_members_are_wired_to_leaderworkersets_environment() -> None:
    # Each pod of the group, as the supervisor would plan it with the variables that
    # LeaderWorkerSet sets in it: the leader asks no one, the worker asks the leader at the
    # control port they share; the group fails as one, and LeaderWorkerSet recreates it.
    (lws, *_) = documents(KUBERNETES / "leaderworkerset.yaml")
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["restartPolicy"] == "RecreateGroupOnPodRestart"
    size = template["size"]
    leader = "vllm-dp16-0.vllm-dp16.default"
    for index, container in enumerate(containers_of(KUBERNETES / "leaderworkerset.yaml")):
        config = config_of(container)
        environ = {
            "LWS_LEADER_ADDRESS": leader,
            "LWS_GROUP_SIZE": str(size),
            "LWS_WORKER_INDEX": str(index),
        }
        plan = plan_group(config, environ)
        assert plan is not None
        assert (plan.member, plan.size, plan.group_id) == (index, size, leader)
        assert plan.peers == (() if index == 0 else (f"http://{leader}:{config.control_port}",))
        # A lost node is noticed in seconds, and a planned stop of one member (the other's
        # drain, then the peer timeout and its last words) fits the pod's grace period.
        assert config.peer_timeout <= 10
        grace = template["leaderTemplate"]["spec"]["terminationGracePeriodSeconds"]
        stop = config.router_timeout + config.drain_delay + config.drain_timeout
        assert grace > stop + config.grace_period + config.peer_timeout + LINGER
