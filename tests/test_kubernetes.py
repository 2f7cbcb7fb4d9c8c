"""deploy/kubernetes/: every overlay renders, validates offline against the Kubernetes API schemas
(kubernetes-validate ships them), and agrees with the image and the service it deploys.

Rendering: tests/kustomize.py, the subset of Kustomize the manifests use, checked against
`kubectl kustomize` where kubectl is installed. The KEDA ScaledObject is a custom resource, whose
schema the package does not ship: it is checked against KEDA_SCALED_OBJECT below, the fields of
KEDA 2's ScaledObject CRD (keda.sh/v1alpha1) that a manifest may set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import fields
from pathlib import Path

import jsonschema
import pytest
import yaml

from service.config import ServiceConfig
from tests.conftest import REPO
from tests.kustomize import KustomizeError, render

KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = ("overlays/cpu", "overlays/gpu")
# Kubernetes versions the manifests must be valid for: the oldest still maintained when the schemas
# shipped (kubernetes-validate 1.37.0 has 1.25-1.37) and the newest.
VERSIONS = ("1.31.0", "1.37.0")
IMAGE_PORT = 3000  # BentoML's default HTTP port, the image's EXPOSE (tests/test_container.py checks the image)
IMAGE_UID = 1034  # the image's `bentoml` user (tests/test_container.py: USER_UID)
EXIT_ALLOWANCE_S = 10  # after the last request: workers and arbiter exit (1-2 s measured, tests/test_drain.py)

KEDA_SCALED_OBJECT = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                  "name": {"type": "string"},
                                                  "envSourceContainerName": {"type": "string"}}},
                **{name: {"type": "integer", "minimum": 0} for name in (
                    "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
                    "minReplicaCount", "maxReplicaCount")},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                      "properties": {"name": {"type": "string"},
                                                                     "behavior": {"type": "object"}}},
                    "scalingModifiers": {"type": "object"}}},
                "fallback": {"type": "object", "required": ["failureThreshold", "replicas"]},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                   "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "authenticationRef": {"type": "object", "required": ["name"]},
                                   "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                   "useCachedMetrics": {"type": "boolean"}}}},
            },
        },
    },
}


def with_keda(overlay: str, tmp_path: Path) -> Path:
    """An overlay plus components/keda, as docs/deployment.md tells users to make one."""
    folder = tmp_path / overlay.replace("/", "-")
    folder.mkdir()
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        # relative paths: kustomize refuses absolute ones
        "resources": [os.path.relpath(KUBERNETES / overlay, folder)],
        "components": [os.path.relpath(KUBERNETES / "components" / "keda", folder)]}))
    return folder


@pytest.fixture(params=[*OVERLAYS, *(f"{overlay}+keda" for overlay in OVERLAYS)])
def rendered(request, tmp_path) -> tuple[str, Path, list[dict]]:
    name = request.param
    folder = with_keda(name.removesuffix("+keda"), tmp_path) if name.endswith("+keda") else KUBERNETES / name
    return name, folder, render(folder)


def one(resources: list[dict], kind: str) -> dict:
    [resource] = [r for r in resources if r["kind"] == kind]
    return resource


def container(resources: list[dict]) -> dict:
    [keel] = one(resources, "Deployment")["spec"]["template"]["spec"]["containers"]
    return keel


def config(resources: list[dict]) -> dict[str, str]:
    return one(resources, "ConfigMap")["data"]


def test_every_rendered_manifest_validates_against_the_api_schemas(rendered):
    import kubernetes_validate

    name, _, resources = rendered
    kinds = sorted(r["kind"] for r in resources)
    expected = ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]
    assert kinds == sorted(expected + (["ScaledObject"] if name.endswith("+keda") else ["HorizontalPodAutoscaler"]))
    for resource in resources:
        if resource["kind"] == "ScaledObject":
            jsonschema.validate(resource, KEDA_SCALED_OBJECT)
            continue
        for version in VERSIONS:  # strict: an unknown (misspelt) field is an error too
            kubernetes_validate.validate(resource, version, strict=True)


def test_validation_catches_a_misspelt_field():
    import kubernetes_validate

    deployment = one(render(KUBERNETES / "overlays" / "cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: renderer not cross-checked")
def test_renderer_agrees_with_kubectl_kustomize(rendered):
    _, folder, resources = rendered
    output = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert output.returncode == 0, output.stderr
    theirs = {(r["kind"], r["metadata"]["name"]): r for r in yaml.safe_load_all(output.stdout) if r}
    assert {(r["kind"], r["metadata"]["name"]): r for r in resources} == theirs


def test_renderer_refuses_kustomize_features_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: [../x]\nnamePrefix: prod-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        render(tmp_path)


def test_probes_and_ports_match_the_image(rendered):
    _, _, resources = rendered
    keel = container(resources)
    assert keel["ports"] == [{"name": "http", "containerPort": IMAGE_PORT, "protocol": "TCP"}]
    probes = {kind: keel[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {"startupProbe": {"path": "/readyz", "port": "http"},
                      "readinessProbe": {"path": "/readyz", "port": "http"},
                      "livenessProbe": {"path": "/livez", "port": "http"}}
    service = one(resources, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    from bentoml._internal.configuration.containers import BentoMLContainer

    assert BentoMLContainer.http.port.get() == IMAGE_PORT  # what `bentoml serve` in the image binds


def test_probe_paths_are_answered_by_the_real_service(server):
    """The paths the probes and the KEDA query use, on a real `bentoml serve` (the session's)."""
    resources = render(KUBERNETES / "overlays" / "cpu")
    keel = container(resources)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        with urllib.request.urlopen(server.url + keel[kind]["httpGet"]["path"], timeout=10) as response:
            assert response.status == 200
    # the metric the ScaledObject's query sums, under the labels it selects
    request = urllib.request.Request(server.url + "/classify", data=b"not an image", headers={
        "Content-Type": "image/png"}, method="POST")
    try:
        urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as error:
        assert error.code == 400
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    query = keda_query()
    assert query.startswith("sum(bentoml_service_request_in_progress{")
    assert any(line.startswith("bentoml_service_request_in_progress{") and 'endpoint="/classify"' in line
               and 'service_name="keel"' in line for line in metrics.splitlines()), metrics[:2000]


def keda_query() -> str:
    scaled_object = yaml.safe_load((KUBERNETES / "components" / "keda" / "scaledobject.yaml").read_text())
    return " ".join(scaled_object["spec"]["triggers"][0]["metadata"]["query"].split())


def test_configuration_is_keel_variables_the_service_reads(rendered):
    _, _, resources = rendered
    known = {f"KEEL_{f.name.upper()}" for f in fields(ServiceConfig)}
    data = config(resources)
    assert set(data) <= known, set(data) - known
    ServiceConfig.from_env(data)  # every value parses: a bad one would stop the server at start-up
    keel = container(resources)
    assert keel["envFrom"] == [{"configMapRef": {"name": one(resources, "ConfigMap")["metadata"]["name"]}}]
    env = {variable["name"]: variable["value"] for variable in keel["env"]}
    assert not {name for name in env if name.startswith("KEEL_")}, "KEEL_* settings belong in the ConfigMap"
    # BentoML's scratch store on the writable volume, as the hardened container runs (tests/test_container.py)
    assert env["BENTOML_HOME"] == "/tmp/bentoml"
    assert {"name": "tmp", "mountPath": "/tmp"} in keel["volumeMounts"]


def test_runs_hardened_as_the_container_test_runs_the_image(rendered):
    _, _, resources = rendered
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == IMAGE_UID
    security = container(resources)["securityContext"]
    assert security == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]}}


def grace(resources: list[dict]) -> tuple[int, int]:
    """(terminationGracePeriodSeconds, preStop sleep seconds) of the Deployment."""
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    command = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return pod["terminationGracePeriodSeconds"], int(command[1])


def grace_budget_s() -> float:
    """What a replica has from SIGTERM to exit before the kubelet kills it: the grace period less the
    preStop sleep, which runs first (tests/test_drain.py holds a real server to it)."""
    period, sleep = grace(render(KUBERNETES / "overlays" / "cpu"))
    return period - sleep


def test_grace_period_covers_the_prestop_sleep_the_longest_request_and_the_exit(rendered):
    _, _, resources = rendered
    period, sleep = grace(resources)
    timeout = ServiceConfig.from_env(config(resources)).request_timeout_s
    assert period >= sleep + timeout + EXIT_ALLOWANCE_S, (period, sleep, timeout)
    assert sleep >= 2  # endpoints and kube-proxy need a moment to drop the pod before it stops listening


def test_cpu_and_gpu_overlays(rendered):
    name, _, resources = rendered
    keel = container(resources)
    requests, limits = keel["resources"]["requests"], keel["resources"]["limits"]
    # a CPU limit equal to the request: Keel sizes its workers and threads to the cgroup's quota
    assert requests["cpu"] == limits["cpu"] and requests["memory"] == limits["memory"]
    if name.startswith("overlays/gpu"):
        assert limits["nvidia.com/gpu"] == 1 and config(resources)["KEEL_DEVICE"] == "cuda"
        pod = one(resources, "Deployment")["spec"]["template"]["spec"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        startup = keel["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # CUDA load + cuDNN searches
    else:
        assert "nvidia.com/gpu" not in limits and config(resources)["KEEL_DEVICE"] == "cpu"
        startup = keel["startupProbe"]
        # docs/deployment.md: cold start 5-11 s on a busy 2-core machine; several times that allowed
        assert 30 <= startup["periodSeconds"] * startup["failureThreshold"] <= 120


def test_selectors_and_scaling_target_the_deployment(rendered):
    name, _, resources = rendered
    deployment = one(resources, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert one(resources, "Service")["spec"]["selector"].items() <= labels.items()
    assert one(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    scaler = one(resources, "ScaledObject" if name.endswith("+keda") else "HorizontalPodAutoscaler")
    assert scaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    # a rollout never goes below the replicas serving now: the new version warms up first
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    if name.endswith("+keda"):
        trigger = scaler["spec"]["triggers"][0]
        assert trigger["type"] == "prometheus" and int(trigger["metadata"]["threshold"]) > 0
        assert 'service_name="keel"' in keda_query()


def test_manifests_are_plain_yaml_documents():
    """Every file parses, and each resource names its apiVersion and kind (what `kubectl apply` needs)."""
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert document and "apiVersion" in document and "kind" in document, path
    json.dumps(render(KUBERNETES / "overlays" / "gpu"))  # plain data, nothing YAML-specific
