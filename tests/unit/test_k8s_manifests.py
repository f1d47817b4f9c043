"""deploy/k8s and its gvisor overlay (deploy/k8s-gvisor) are valid Kubernetes objects, checked
offline against the Kubernetes JSON schemas (kubernetes-validate bundles them), and run the fleet:
executors with a sandbox driver named, every other service replicated, probed on gRPC health,
covered by a disruption budget, and the routers autoscaled."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.common.settings import DEFAULT_PORTS, INTERNAL_PORT_OFFSET, SERVICES

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "k8s"
GVISOR_DIR = ROOT / "deploy" / "k8s-gvisor"
# Applied by hand, never by the kustomization.
EXAMPLES = ("secret.example.yaml", "pki-cert-manager.example.yaml")
# The oldest Kubernetes the manifests are for (native gRPC probes, policy/v1, autoscaling/v2 and
# Pod Security admission are all older) and the newest whose schemas the package bundles.
KUBERNETES = ("1.30.0", kubernetes_validate.latest_version())
# Objects of cert-manager's, whose schemas are not Kubernetes'.
CUSTOM = {"cert-manager.io/v1"}
Doc = dict[str, Any]


def load(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_documents() -> dict[str, list[Doc]]:
    """The kustomization's own files (no ../envoy, no overlay), by file name."""
    return {p.name: load(p) for p in sorted(K8S_DIR.glob("*.yaml")) if p.name != "kustomization.yaml"}


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch as kustomize applies it to these manifests: maps merge key by
    key, lists of named items merge by name (containers, env), other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(
            isinstance(x, dict) and "name" in x for x in base + patch):
        out_list = list(base)
        for item in patch:
            names = [x["name"] for x in out_list]
            if item["name"] in names:
                i = names.index(item["name"])
                out_list[i] = merge(out_list[i], item)
            else:
                out_list.append(item)
        return out_list
    return patch


def gvisor_documents() -> list[Doc]:
    """The base with the overlay's patches applied (what `kubectl kustomize` renders, without
    the namespace and labels kustomize adds)."""
    overlay = yaml.safe_load((GVISOR_DIR / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../k8s"]
    docs = [d for name, found in base_documents().items() if name not in EXAMPLES for d in found]
    for entry in overlay["patches"]:
        (patch,) = load(GVISOR_DIR / entry["path"])
        target = find(docs, patch["kind"], patch["metadata"]["name"])
        # A patch whose container or env names match nothing would add, not change: refuse.
        for container in patch["spec"]["template"]["spec"]["containers"]:
            (base,) = [c for c in target["spec"]["template"]["spec"]["containers"]
                       if c["name"] == container["name"]]
            names = {e["name"] for e in base["env"]}
            assert {e["name"] for e in container.get("env", [])} <= names, entry["path"]
        docs[docs.index(target)] = merge(target, patch)
    return docs


def validate(doc: Doc, version: str) -> None:
    """Fails naming the object, the field and what is wrong (the schema's own error repeats the
    whole schema)."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
        return
    except kubernetes_validate.ValidationError as exc:
        problem = f"{exc.message} (at {'/'.join(map(str, exc.path)) or 'the top'})"
    pytest.fail(f"{doc['kind']} {doc['metadata']['name']} is not valid in Kubernetes {version}: "
                f"{problem}", pytrace=False)


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def env_of(container: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --- The schemas --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize("name", sorted(base_documents()))
def test_every_manifest_is_valid_against_the_kubernetes_schemas(name: str, version: str) -> None:
    docs = base_documents()[name]
    assert docs, name
    for doc in docs:
        if doc["apiVersion"] in CUSTOM:
            continue
        validate(doc, version)


@pytest.mark.parametrize("version", KUBERNETES)
def test_the_gvisor_overlay_patches_the_executor_into_a_valid_statefulset(version: str) -> None:
    docs = gvisor_documents()
    for doc in docs:
        validate(doc, version)
    (container,) = pod_spec(find(docs, "StatefulSet", "executor"))["containers"]
    env = [e["name"] for e in container["env"]]
    assert env.count("CORRAL_SANDBOX_DRIVER") == 1
    assert env_of(container)["CORRAL_SANDBOX_DRIVER"] == "gvisor"
    # Everything else about the executor is the base's.
    (base,) = pod_spec(find(base_documents()["executor.yaml"], "StatefulSet", "executor"))[
        "containers"]
    assert {k: v for k, v in env_of(container).items() if k != "CORRAL_SANDBOX_DRIVER"} == {
        k: v for k, v in env_of(base).items() if k != "CORRAL_SANDBOX_DRIVER"}


BREAKAGES = [
    # A misspelt field (strict: unknown fields are errors, as the API server's strict decoding).
    ("router.yaml", "readinessProbe:", "readynessProbe:"),
    # A port that is not a number.
    ("sessions.yaml", "containerPort: 50053", 'containerPort: "fifty"'),
    # A required field gone: an HPA without its target.
    ("router.yaml", "  scaleTargetRef: { apiVersion: apps/v1, kind: Deployment, name: router }\n", ""),
    # A wrong type: replicas as a string.
    ("executor.yaml", "replicas: 2", 'replicas: "two"'),
]


@pytest.mark.parametrize(("name", "old", "new"), BREAKAGES)
def test_validation_rejects_a_broken_manifest(name: str, old: str, new: str) -> None:
    # The checks above have teeth: each of these breakages fails them.
    text = (K8S_DIR / name).read_text()
    assert old in text
    broken = [d for d in yaml.safe_load_all(text.replace(old, new, 1)) if d]
    with pytest.raises(pytest.fail.Exception, match="is not valid in Kubernetes"):
        for doc in broken:
            validate(doc, KUBERNETES[0])


def test_the_kustomization_lists_every_manifest_and_the_overlay_only_patches() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml", *EXAMPLES}
    assert {r for r in kustomization["resources"] if r.endswith(".yaml")} == on_disk
    overlay = yaml.safe_load((GVISOR_DIR / "kustomization.yaml").read_text())
    files = {p.name for p in GVISOR_DIR.iterdir()} - {"kustomization.yaml"}
    assert {p["path"] for p in overlay["patches"]} == files


# --- What the fleet needs -----------------------------------------------------------------------


def workloads() -> dict[str, Doc]:
    docs = base_documents()
    return {svc: find(docs[f"{svc}.yaml"], "StatefulSet" if svc == "executor" else "Deployment",
                      svc) for svc in (*SERVICES, "envoy")}


@pytest.mark.parametrize("svc", [*SERVICES, "envoy"])
def test_every_workload_is_replicated_spread_and_has_a_disruption_budget(svc: str) -> None:
    docs = base_documents()[f"{svc}.yaml"]
    workload = workloads()[svc]
    autoscaler = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    if svc == "router":
        # The autoscaler owns the count: a replicas field would reset it at every apply.
        assert "replicas" not in workload["spec"]
        (hpa,) = autoscaler
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1", "kind": "Deployment", "name": "router"}
        assert hpa["spec"]["minReplicas"] >= 2
        assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    else:
        assert not autoscaler
        assert workload["spec"]["replicas"] >= 2
    labels = workload["spec"]["selector"]["matchLabels"]
    (budget,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert budget["spec"]["selector"]["matchLabels"] == labels
    # One pod at a time may go, at most.
    assert budget["spec"].get("minAvailable", 0) >= 1 or budget["spec"].get("maxUnavailable") == 1
    (spread,) = pod_spec(workload)["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"] == labels


@pytest.mark.parametrize("svc", SERVICES)
def test_every_service_is_probed_on_grpc_health_and_has_requests_and_limits(svc: str) -> None:
    (container,) = pod_spec(workloads()[svc])["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # Kubernetes' own gRPC probe: grpc.health.v1, the empty service name (the server's
        # overall health), on the public port.
        assert container[probe]["grpc"] == {"port": DEFAULT_PORTS[svc]}, probe
    resources = container["resources"]
    assert set(resources) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(
        resources["limits"])


def restricted(workload: Doc) -> list[str]:
    """How the workload falls short of the restricted Pod Security Standard (the parts these
    manifests could get wrong)."""
    pod = pod_spec(workload)
    context = pod.get("securityContext", {})
    faults = []
    if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        faults.append("seccomp")
    for c in pod["containers"]:
        sc = {**context, **c.get("securityContext", {})}
        if not sc.get("runAsNonRoot") or sc.get("runAsUser") == 0:
            faults.append("root")
        if sc.get("privileged"):
            faults.append("privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            faults.append("escalation")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            faults.append("capabilities")
    return faults


def test_only_the_executor_runs_outside_the_restricted_pod_security_standard() -> None:
    loose = {svc: faults for svc, w in workloads().items() if (faults := restricted(w))}
    assert set(loose) == {"executor"}, loose
    # The namespace admits it, and still warns about and audits any other pod that falls short.
    (namespace,) = base_documents()["namespace.yaml"]
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert labels["pod-security.kubernetes.io/audit"] == "restricted"


@pytest.mark.parametrize("overlay", ["base", "gvisor"])
def test_executors_name_a_real_sandbox_driver_and_what_they_need_for_it(overlay: str) -> None:
    docs = gvisor_documents() if overlay == "gvisor" else [
        d for found in base_documents().values() for d in found]
    executor = find(docs, "StatefulSet", "executor")
    (container,) = pod_spec(executor)["containers"]
    env = env_of(container)
    # Never left unset (the executor would pick one, and the process driver when bubblewrap is
    # unusable): named, so that the executor refuses to start without it.
    assert env["CORRAL_SANDBOX_DRIVER"] == {"base": "bwrap", "gvisor": "gvisor"}[overlay]
    # Root, namespaces and writable cgroups for the sandboxes.
    assert container["securityContext"]["privileged"] is True
    assert pod_spec(executor)["securityContext"]["runAsUser"] == 0
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp", "/run"}


def test_each_executor_registers_under_its_pods_name_and_stable_address() -> None:
    docs = base_documents()["executor.yaml"]
    executor = find(docs, "StatefulSet", "executor")
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert service["spec"]["clusterIP"] == "None"
    assert executor["spec"]["serviceName"] == service["metadata"]["name"] == "executor"
    (container,) = pod_spec(executor)["containers"]
    env = env_of(container)
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["CORRAL_EXECUTOR_NAME"] == "$(POD_NAME)"
    # The other services reach an executor at its mutual-TLS listener, the public port plus 10.
    port = DEFAULT_PORTS["executor"] + INTERNAL_PORT_OFFSET
    assert env["CORRAL_EXECUTOR_ADVERTISE"] == f"$(POD_NAME).executor.$(POD_NAMESPACE).svc:{port}"
    # Kubernetes expands $(VAR) only from variables defined earlier in the list.
    names = [e["name"] for e in container["env"]]
    assert names.index("POD_NAME") < names.index("CORRAL_EXECUTOR_NAME")
    assert names.index("POD_NAMESPACE") < names.index("CORRAL_EXECUTOR_ADVERTISE")


# --- Rendered by kustomize, where kubectl is installed -------------------------------------------


@pytest.mark.parametrize("directory", [K8S_DIR, GVISOR_DIR], ids=["base", "gvisor"])
def test_kustomize_renders_valid_objects(directory: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the checks above cover the files and the patch")
    result = subprocess.run([kubectl, "kustomize", str(directory)], check=False,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    for doc in rendered:
        for version in KUBERNETES:
            validate(copy.deepcopy(doc), version)
    # The file-by-file reading above sees what kustomize renders, but for kustomize's additions.
    executor = find(rendered, "StatefulSet", "executor")
    (container,) = pod_spec(executor)["containers"]
    driver = "gvisor" if directory == GVISOR_DIR else "bwrap"
    assert env_of(container)["CORRAL_SANDBOX_DRIVER"] == driver
    assert {d["metadata"].get("namespace") for d in rendered if d["kind"] != "Namespace"} == {
        "corral"}
