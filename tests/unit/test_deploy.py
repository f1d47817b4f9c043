"""deploy/: the Envoy configs pass the real Envoy's validation and route as documented, and the
Kubernetes manifests run each service under its own name, point every address at a Service, and
give each service its own certificate and only the secrets it uses."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from scripts import genenvoy
from services.common.auth.methods import METHODS
from services.common.auth.oidc import parse_issuers
from services.common.auth.pki import ensure_pki, load_identity
from services.common.settings import DEFAULT_PORTS, INTERNAL_PORT_OFFSET, SERVICES, Settings
from tests.edge import envoy_validate, routes, self_signed

ROOT = Path(__file__).resolve().parents[2]
ENVOY_DIR = ROOT / "deploy" / "envoy"
K8S_DIR = ROOT / "deploy" / "k8s"
CONFIGS = ("envoy.yaml", "envoy-local.yaml")
# Applied by hand, never by the kustomization: credentials templates and optional extras.
EXAMPLES = ("secret.example.yaml", "pki-cert-manager.example.yaml")
PKI_DIR = "/etc/corral/pki"
PRODUCTION_TLS = ("/etc/envoy/tls/tls.crt", "/etc/envoy/tls/tls.key")


# --- Envoy -------------------------------------------------------------------------------------


ENDPOINT = re.compile(r"socket_address: \{ address: ([\w.-]+), port_value: (\d+) \}")


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


def test_the_committed_configs_are_what_make_envoy_generates() -> None:
    assert genenvoy.main(["--check"]) == 0, "run `make envoy` and commit deploy/envoy"


@pytest.mark.parametrize("name", CONFIGS)
def test_envoy_accepts_the_config(name: str, tmp_path: Path) -> None:
    text = (ENVOY_DIR / name).read_text()
    # Production reads its certificate from the envoy-tls Secret: validate with one of our own.
    cert, key = self_signed(tmp_path)
    text = text.replace(PRODUCTION_TLS[0], str(cert)).replace(PRODUCTION_TLS[1], str(key))
    (tmp_path / name).write_text(text)
    result = envoy_validate(tmp_path / name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"configuration '{tmp_path / name}' OK" in result.stdout + result.stderr


def test_envoy_validation_rejects_a_route_to_a_cluster_that_does_not_exist(tmp_path: Path) -> None:
    # The check above has teeth: routing to an undefined cluster fails.
    text = (ENVOY_DIR / "envoy-local.yaml").read_text()
    broken = text.replace('"cluster": "sessions"', '"cluster": "nowhere"', 1)
    assert broken != text
    (tmp_path / "envoy.yaml").write_text(broken)
    result = envoy_validate(tmp_path / "envoy.yaml")
    assert result.returncode != 0
    assert "nowhere" in result.stdout + result.stderr


@pytest.mark.parametrize("name", CONFIGS)
def test_envoy_routes_exactly_the_public_methods_and_refuses_the_internal_ones(name: str) -> None:
    found = routes((ENVOY_DIR / name).read_text())
    by_path = {match["path"]: target for match, target in found if "path" in match}
    assert len(by_path) == len(found) - 1, "a method has two routes"
    for method, access in METHODS.items():
        expected = genenvoy.cluster_of(method) if genenvoy.is_public(access) else "403"
        assert by_path[method] == expected, method
    assert by_path["/corral.executor.v1.ExecutorService/Execute"] == "403"
    assert by_path["/corral.router.v1.RouterService/Invoke"] == "router"
    # Last, for everything else: UNIMPLEMENTED.
    assert found[-1] == ({"prefix": "/"}, "404")


def test_envoy_clusters_dial_kubernetes_services_and_local_ones_dial_default_ports() -> None:
    k8s = clusters((ENVOY_DIR / "envoy.yaml").read_text())
    local = clusters((ENVOY_DIR / "envoy-local.yaml").read_text())
    assert {c: a for c, a in k8s.items() if c in SERVICES} == {
        svc: (svc, DEFAULT_PORTS[svc]) for svc in SERVICES}
    assert local == {svc: ("127.0.0.1", DEFAULT_PORTS[svc]) for svc in SERVICES}


def test_production_terminates_tls_and_verifies_jwts_first() -> None:
    text = (ENVOY_DIR / "envoy.yaml").read_text()
    listeners = text.split("\n  listeners:\n", 1)[1].split("\n  clusters:\n", 1)[0]
    assert len(re.findall(r"(?m)^  - name: ", listeners)) == 1
    assert "DownstreamTlsContext" in listeners and "port_value: 8443" in listeners
    filters = re.findall(r"(?m)^          - name: (envoy\.filters\.http\.\w+)$", listeners)
    assert filters.index("envoy.filters.http.header_mutation") < filters.index(
        "envoy.filters.http.jwt_authn") < filters.index("envoy.filters.http.local_ratelimit")
    assert filters[-1] == "envoy.filters.http.router"
    assert '"prefix": "Bearer crl_"' in listeners
    assert "socket_address: { address: 127.0.0.1, port_value: 9901 }" in text


@pytest.mark.parametrize("name", CONFIGS)
def test_envoy_speaks_http2_upstream_and_keeps_router_streams_open(name: str) -> None:
    text = (ENVOY_DIR / name).read_text()
    section = text.split("\n  clusters:\n", 1)[1]
    assert section.count('"http2_protocol_options"') == len(SERVICES)
    assert section.count('"grpc_health_check": {}') == len(SERVICES)
    after_router_match = text.split('"path": "/corral.router.v1.RouterService/Converse"}', 1)[1]
    router_route = after_router_match.split("- match:", 1)[0]
    assert '"timeout": "0s"' in router_route
    assert '"idle_timeout": "3600s"' in router_route
    for filter_or_header in ("http.grpc_web", "http.cors", "grpc-status-details-bin"):
        assert filter_or_header in text


# --- Kubernetes --------------------------------------------------------------------------------


def manifests() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def deployed() -> list[Path]:
    """The manifests the kustomization applies."""
    return [p for p in manifests() if p.name not in EXAMPLES]


def documents(path: Path) -> list[str]:
    return [d for d in re.split(r"(?m)^---$", path.read_text()) if re.search(r"(?m)^kind: ", d)]


def kind_and_name(doc: str) -> tuple[str, str]:
    kind = re.search(r"(?m)^kind: (\w+)$", doc)
    name = re.search(r"(?m)^metadata:\n(?:  .*\n)*?  name: ([\w.-]+)$", doc)
    assert kind and name, doc
    return kind.group(1), name.group(1)


def k8s_services() -> dict[str, int]:
    """gRPC Service name → its public gRPC port, over every manifest."""
    return {name: ports["grpc"] for name, ports in k8s_service_ports().items() if "grpc" in ports}


def k8s_service_ports() -> dict[str, dict[str, int]]:
    """Service name → {port name: port}, over every manifest; each port targets the container
    port of its own name."""
    found = {}
    for path in manifests():
        for doc in documents(path):
            kind, name = kind_and_name(doc)
            if kind == "Service":
                ports = re.findall(r"(?m)^  - \{ name: ([\w-]+), port: (\d+), targetPort: ([\w-]+)\b",
                                   doc)
                assert ports, f"{path.name}: Service {name} has no ports"
                for port_name, _, target in ports:
                    assert target == port_name, f"{path.name}: {name} {port_name} → {target}"
                found[name] = {port_name: int(port) for port_name, port, _ in ports}
    return found


def container_ports(text: str) -> dict[str, int]:
    return {name: int(port) for name, port in re.findall(
        r"(?m)^        - \{ name: ([\w-]+), containerPort: (\d+) \}$", text)}


def config_map() -> dict[str, str]:
    """The data of ConfigMap corral-config (every value is one quoted string)."""
    text = (K8S_DIR / "config.yaml").read_text()
    return dict(re.findall(r'(?m)^  (CORRAL_\w+): "([^"]*)"$', text))


def workload(svc: str) -> str:
    """The Deployment or StatefulSet running `svc`."""
    (doc,) = [d for d in documents(K8S_DIR / f"{svc}.yaml")
              if kind_and_name(d) in {("Deployment", svc), ("StatefulSet", svc)}]
    return doc


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    text = (K8S_DIR / "kustomization.yaml").read_text()
    listed = re.findall(r"(?m)^- (\S+)$", text.split("\nresources:\n", 1)[1])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml", *EXAMPLES}
    assert {x for x in listed if x.endswith(".yaml")} == on_disk
    assert {p.name for p in K8S_DIR.glob("*.example.yaml")} == set(EXAMPLES)
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
    internal = port + INTERNAL_PORT_OFFSET
    assert f'- {{ name: CORRAL_{svc.upper()}_LISTEN, value: "0.0.0.0:{port}" }}' in text
    assert f'- {{ name: CORRAL_{svc.upper()}_INTERNAL_LISTEN, value: "0.0.0.0:{internal}" }}' in text
    ports = container_ports(text)
    assert (ports["grpc"], ports["internal"]) == (port, internal)
    assert set(ports) <= {"grpc", "internal", "http", "metrics", "otlp-http"}
    # Prometheus finds each service's /metrics by the port's name (deploy/prometheus).
    defaults = Settings.from_env({})
    metrics = defaults.metrics_ports.get(svc, defaults.executor.http_port)
    assert ports["metrics" if svc != "executor" else "http"] == metrics
    # Startup, readiness and liveness all ask gRPC health on the service's own port.
    assert text.count(f"grpc: {{ port: {port} }}") == 3
    if svc != "executor":  # privileged for its sandboxes (test_k8s_manifests.py)
        assert "runAsNonRoot: true" in text and "allowPrivilegeEscalation: false" in text
    assert "limits:" in text and "requests:" in text


def test_executor_is_a_statefulset_behind_a_headless_service() -> None:
    text = (K8S_DIR / "executor.yaml").read_text()
    assert "clusterIP: None" in text
    assert "serviceName: executor" in text
    assert "volumeClaimTemplates:" in text


def test_every_address_points_at_a_service_on_its_port() -> None:
    services = k8s_services()
    addrs = {}
    for path in manifests():
        for svc, host, port in re.findall(
            r'CORRAL_([A-Z]+)_ADDR: "([\w.-]+):(\d+)"', path.read_text()
        ):
            addrs[svc.lower()] = (host, int(port))
    assert set(addrs) == set(SERVICES)
    for svc, (host, port) in addrs.items():
        assert host in services, f"CORRAL_{svc.upper()}_ADDR names {host}, which is no Service"
        assert services[host] == port, (
            f"CORRAL_{svc.upper()}_ADDR uses port {port}, {host} serves {services[host]}"
        )
    # Envoy in the cluster dials the same Services (its other clusters fetch JWKS).
    for cluster, (host, port) in clusters((ENVOY_DIR / "envoy.yaml").read_text()).items():
        if cluster not in SERVICES:
            continue
        assert services.get(host) == port, f"Envoy cluster {cluster} dials {host}:{port}"


def test_every_service_exposes_its_internal_port_on_its_service_and_container() -> None:
    services = k8s_service_ports()
    for svc in SERVICES:
        internal = DEFAULT_PORTS[svc] + INTERNAL_PORT_OFFSET
        assert services[svc]["grpc"] == DEFAULT_PORTS[svc], svc
        assert services[svc]["internal"] == internal, svc
        # The same number on both ends, so that it holds for the headless executor too, whose
        # clients dial the pods' own ports.
        assert container_ports(workload(svc))["internal"] == internal, svc
    assert "clusterIP: None" in (K8S_DIR / "executor.yaml").read_text()


def test_every_internal_address_is_a_services_internal_port_as_the_settings_read_it() -> None:
    config = config_map()
    services = k8s_service_ports()
    named = {svc.lower() for svc in re.findall(r"CORRAL_([A-Z]+)_INTERNAL_ADDR", str(config))}
    assert named == set(SERVICES)
    settings = Settings.from_env(config)
    for svc in SERVICES:
        host, _, port = config[f"CORRAL_{svc.upper()}_INTERNAL_ADDR"].rpartition(":")
        assert settings.internal_addrs[svc] == f"{host}:{port}"
        assert host == svc, f"{svc} is dialled as {host}, a name its certificate may not hold"
        assert int(port) == services[host]["internal"], f"{svc}: {port} is not {host}'s internal port"
        assert int(port) == services[host]["grpc"] + INTERNAL_PORT_OFFSET
    # Public addresses are untouched: they are the Services' gRPC ports.
    assert dict(settings.addrs) == {svc: f"{svc}:{port}" for svc, port in DEFAULT_PORTS.items()}


def test_the_commented_identity_provider_example_is_a_valid_configuration() -> None:
    text = (K8S_DIR / "config.yaml").read_text()
    block = text.split("  # CORRAL_OIDC_ISSUERS: >-\n", 1)[1]
    example = " ".join(line.removeprefix("  #").strip() for line in block.splitlines())
    (issuer,) = parse_issuers(example)
    assert issuer.issuer == "https://sso.example.com/realms/corral"
    assert "CORRAL_OIDC_ISSUERS" not in config_map(), "identity providers are the operator's choice"


PKI_ITEMS = re.compile(r"(?m)^          - \{ key: ([\w.]+), path: ([\w.]+) \}$")


@pytest.mark.parametrize("svc", SERVICES)
def test_each_workload_mounts_only_its_own_certificate_and_key(svc: str, tmp_path: Path) -> None:
    doc = workload(svc)
    assert re.findall(r"secretName: (corral-pki-[\w-]+)", doc) == [f"corral-pki-{svc}"]
    assert f"- {{ name: pki, mountPath: {PKI_DIR}, readOnly: true }}" in doc
    assert f"- {{ name: CORRAL_PKI_DIR, value: {PKI_DIR} }}" in doc
    volume = doc.split("      - name: pki\n", 1)[1]
    assert "          defaultMode: 0400\n" in volume
    items = dict(PKI_ITEMS.findall(volume))
    assert items == {"ca.crt": "ca.crt", "tls.crt": f"{svc}.crt", "tls.key": f"{svc}.key"}
    # 0400 is widened to 0440 for fsGroup: the service reads its key through its group (the
    # executor runs as root, for its sandboxes).
    user = 0 if svc == "executor" else 10001
    assert f"runAsUser: {user}" in doc and f"runAsGroup: {user}" in doc and "fsGroup: 10001" in doc
    # What the service reads from that mount is what the launcher issues, under those names.
    issued = tmp_path / "issued"
    ensure_pki(issued, [svc])
    secret = {"ca.crt": issued / "ca.crt", "tls.crt": issued / f"{svc}.crt",
              "tls.key": issued / f"{svc}.key"}
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    for key, path in items.items():
        (mounted / path).write_bytes(secret[key].read_bytes())
    assert load_identity(mounted, svc).service == svc
    # README's `kubectl create secret` writes those keys.
    readme = (K8S_DIR / "README.md").read_text()
    for key, path in items.items():
        source = "ca.crt" if key == "ca.crt" else path.replace(svc, "$svc")
        assert f"--from-file={key}=" in readme and source in readme


def test_no_workload_gets_the_cas_key_or_another_services_certificate() -> None:
    for path in deployed():
        text = path.read_text()
        assert "ca.key" not in text, path.name
        mounted = set(re.findall(r"secretName: corral-pki-([\w-]+)", text))
        assert mounted <= {path.stem}, f"{path.name} mounts the certificates of {mounted}"
    assert "corral-pki-ca" not in "".join(p.read_text() for p in deployed())


def test_cert_manager_issues_each_service_an_ec_certificate_named_after_it() -> None:
    docs = [kind_and_name(d) + (d,) for d in documents(K8S_DIR / "pki-cert-manager.example.yaml")]
    certificates = {name: doc for kind, name, doc in docs if kind == "Certificate"}
    assert set(certificates) == {"corral-pki-ca", *(f"corral-pki-{svc}" for svc in SERVICES)}
    for svc in SERVICES:
        doc = certificates[f"corral-pki-{svc}"]
        assert f"  secretName: corral-pki-{svc}\n" in doc
        assert f"  commonName: {svc}\n" in doc
        assert re.search(rf'(?m)^  dnsNames: \["{svc}",|^  - {svc}$', doc), svc
        # pki.py loads EC keys only, and services sign ES256 assertions with them.
        assert "privateKey: { algorithm: ECDSA, size: 256" in doc
        assert "server auth, client auth" in doc
        assert "issuerRef: { name: corral-pki, kind: Issuer }" in doc
    ca = certificates["corral-pki-ca"]
    assert "isCA: true" in ca and "algorithm: ECDSA, size: 256" in ca
    assert ("Issuer", "corral-pki") in {(kind, name) for kind, name, _ in docs}


def test_only_the_registry_gets_the_secrets_key() -> None:
    secrets = {kind_and_name(d)[1]: d for d in documents(K8S_DIR / "secret.example.yaml")}
    assert set(secrets) == {"corral-storage", "corral-registry-secrets"}
    assert "CORRAL_SECRETS_KEY" in secrets["corral-registry-secrets"]
    assert "CORRAL_SECRETS_KEY" not in secrets["corral-storage"]
    assert re.findall(r"(?m)^  (CORRAL_\w+):", secrets["corral-registry-secrets"]) == [
        "CORRAL_SECRETS_KEY"]
    for path in deployed():
        text = path.read_text()
        loads = "secretRef: { name: corral-registry-secrets }" in text
        assert loads == (path.name == "registry.yaml"), path.name
        if path.name != "secret.example.yaml":
            assert not re.search(r"(?m)^[^#]*CORRAL_SECRETS_KEY", text), path.name


def test_nothing_mentions_the_removed_internal_token() -> None:
    for path in sorted(K8S_DIR.iterdir()):
        assert "INTERNAL_TOKEN" not in path.read_text(), path.name


def test_the_readme_gives_each_service_the_ports_the_settings_use() -> None:
    readme = (K8S_DIR / "README.md").read_text()
    rows = {
        svc: (int(public), int(internal))
        for svc, public, internal in re.findall(r"^\| (\w+) \| (\d+) \| (\d+) \|$", readme, re.MULTILINE)
    }
    assert rows == {svc: (port, port + INTERNAL_PORT_OFFSET) for svc, port in DEFAULT_PORTS.items()}


def test_the_bootstrap_key_is_not_made_by_every_replica() -> None:
    # Each registry pod keeps its own file: set on two replicas, each makes a key revoking the
    # other's (README.md, "The first API key").
    for path in deployed():
        assert not re.search(r"(?m)^[^#]*CORRAL_BOOTSTRAP_ADMIN_KEY_FILE", path.read_text())
    assert "CORRAL_BOOTSTRAP_ADMIN_KEY_FILE=" in (K8S_DIR / "README.md").read_text()


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
    # One certificate Secret per service, mounted 0400 (rendered in decimal).
    assert out.count("defaultMode: 256") == len(SERVICES)
    assert sorted(re.findall(r"secretName: (corral-pki-\w+)", out)) == sorted(
        f"corral-pki-{svc}" for svc in SERVICES)
    assert out.count("  namespace: corral") == len(re.findall(r"(?m)^kind: ", out)) - 1
