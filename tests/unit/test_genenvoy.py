"""scripts/genenvoy.py: the edge's routes follow the method table (a method added there is routed
or refused with nothing edited by hand), and edge.toml's mistakes are reported by name."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from scripts.genenvoy import (
    EDGE_TOML,
    Edge,
    EdgeConfigError,
    Issuer,
    Listener,
    cluster_of,
    edges,
    render,
)
from services.common.auth.methods import METHODS, OPEN, internal, user
from services.common.auth.principal import Role
from tests.edge import envoy_validate, routes

KEYS = {
    "/corral.registry.v1.KeyService/CreateKey": user(Role.ADMIN),
    "/corral.registry.v1.KeyService/ListKeys": user(Role.ADMIN),
    "/corral.registry.v1.KeyService/VerifyKey": internal(*("router", "sessions")),
    "/grpc.health.v1.Health/Check": OPEN,
}
LOCAL = Edge(summary="unit", listeners=(Listener("l", 8080),),
             upstreams={svc: ("127.0.0.1", 1) for svc in
                        ("router", "registry", "sessions", "executor", "telemetry")})


@pytest.mark.parametrize(("method", "cluster"), [
    ("/corral.router.v1.RouterService/Invoke", "router"),
    ("/corral.registry.v1.KeyService/CreateKey", "registry"),
    ("/corral.executor.v1.ExecutorService/ListSandboxes", "executor"),
    ("/opentelemetry.proto.collector.trace.v1.TraceService/Export", "telemetry"),
    # Served by every service: the router answers for the edge.
    ("/corral.identity.v1.IdentityService/WhoAmI", "router"),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "router"),
])
def test_each_method_goes_to_the_service_its_package_names(method: str, cluster: str) -> None:
    assert cluster_of(method) == cluster


def test_a_method_added_to_the_table_is_routed_or_refused_by_its_access() -> None:
    found = {m.get("path", "*"): target for m, target in routes(render(LOCAL, KEYS))}
    assert found == {
        "/corral.registry.v1.KeyService/CreateKey": "registry",
        "/corral.registry.v1.KeyService/ListKeys": "registry",
        "/corral.registry.v1.KeyService/VerifyKey": "403",
        "/grpc.health.v1.Health/Check": "router",
        "*": "404",
    }


def test_without_an_issuer_there_is_no_jwt_filter_and_no_tenant_bucket() -> None:
    text = render(LOCAL, KEYS)
    assert "- name: envoy.filters.http.jwt_authn" not in text
    assert '"key": "credential"' in text and '"key": "tenant"' not in text


def test_several_issuers_each_get_a_provider_a_jwks_cluster_and_any_may_sign(
    tmp_path: Path,
) -> None:
    issuers = (Issuer("https://a.test/", ("corral",), "https://a.test/jwks"),
               Issuer("https://b.test/", ("corral", "cli"), "http://127.0.0.1:9/keys", "org"))
    text = render(Edge(**{**LOCAL.__dict__, "issuers": issuers}))
    assert '"requires_any": {"requirements": [{"provider_name": "issuer_0"}, ' \
           '{"provider_name": "issuer_1"}]}' in text
    assert "  - name: jwks_0" in text and "  - name: jwks_1" in text
    assert '"sni": "a.test"' in text
    # One tenant action per distinct claim.
    assert '{"key": "tenant"}]' in text and '{"key": "org"}]' in text
    (tmp_path / "envoy.yaml").write_text(text)
    result = envoy_validate(tmp_path / "envoy.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_shipped_edge_toml_makes_both_configs() -> None:
    made = edges(tomllib.loads(EDGE_TOML.read_text()))
    assert set(made) == {"envoy.yaml", "envoy-local.yaml"}
    assert made["envoy.yaml"].listeners[0].tls is not None
    assert made["envoy-local.yaml"].listeners[0].tls is None
    assert render(made["envoy.yaml"]).count("/corral.") >= len(
        [m for m in METHODS if m.startswith("/corral.")])


@pytest.mark.parametrize(("change", "message"), [
    ({"rate_limit": {"burst": "lots"}}, "burst must be a whole number"),
    ({"production": {"port": 8443, "tls_key": "k"}}, "tls_cert must be a string"),
    ({"production": {"port": 8443, "tls_cert": "c", "tls_key": "k",
                     "issuers": [{"issuer": "i", "jwks_url": "u"}]}}, "needs audiences"),
    ({"local": []}, r"\[local\] must be a table"),
])
def test_a_mistake_in_edge_toml_is_named(change: dict[str, object], message: str) -> None:
    doc = {**tomllib.loads(EDGE_TOML.read_text()), **change}
    with pytest.raises(EdgeConfigError, match=message):
        edges(doc)
