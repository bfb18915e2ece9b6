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

from trio_dpsup._cli import build_parser

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


def trio_dpsup_options(container: dict[str, Any]) -> list[str]:
    """The options given to trio-dpsup, with the shell's arithmetic and variables filled in."""
    command = container["command"]
    if command[:2] == ["sh", "-c"]:
        script = re.sub(r"\$\(\([^)]*\)\)", "8", command[2])
        script = script.replace("$LWS_LEADER_ADDRESS", "10.0.0.1")
        command = shlex.split(script)
    start = command.index("trio-dpsup") + 1
    return command[start : command.index("--")]


def test_there_are_manifests() -> None:
    assert {p.name for p in MANIFESTS} == {"single-node.yaml", "leaderworkerset.yaml"}


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
        # Kubernetes' SIGKILL must come after our drain and grace period.
        grace = template["spec"]["terminationGracePeriodSeconds"]
        assert grace > args.drain_delay + args.grace_period


def test_the_schema_check_catches_a_misspelt_field() -> None:
    (deployment, _) = documents(KUBERNETES / "single-node.yaml")
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
    (_, service) = documents(KUBERNETES / "leaderworkerset.yaml")
    kubernetes_validate.validate(service, kubernetes_validate.latest_version(), strict=True)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"app": "vllm-dp16"}
    assert {p["name"] for p in service["spec"]["ports"]} == {"control"} | {
        f"rank-{i}" for i in range(8)
    }
