"""Generates deploy/envoy/envoy.yaml and envoy-local.yaml: the edge's routes come from the method
access table (services/common/auth/methods.py), the rest from deploy/envoy/edge.toml and the
templates in deploy/envoy/templates/. `make envoy` runs it; `--check` fails if a file is stale.

Public methods (a user role, any principal, or open) get one exact-path route each; internal ones
(services only) a PERMISSION_DENIED answered by Envoy; any other path UNIMPLEMENTED."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

from services.common.auth.methods import METHODS, Access
from services.common.settings import DEFAULT_PORTS, SERVICES

ROOT = Path(__file__).resolve().parent.parent
ENVOY_DIR = ROOT / "deploy" / "envoy"
TEMPLATES = ENVOY_DIR / "templates"
EDGE_TOML = ENVOY_DIR / "edge.toml"

# How long a route may run. Invoke, InvokeStream and Converse may stay open as long as a session
# lives, bundles stream through PublishVersion and DownloadVersion, WatchEndpoints never ends: no
# overall timeout there, a long idle one. A client's own deadline (grpc-timeout) always applies.
_LONG = {"timeout": "0s", "idle_timeout": "3600s",
         "max_stream_duration": {"grpc_timeout_header_max": "0s"}}
_MINUTE = {"timeout": "60s", "max_stream_duration": {"grpc_timeout_header_max": "60s"}}
ROUTE_LIMITS: Mapping[str, Mapping[str, object]] = {
    "router": _LONG, "registry": _LONG, "sessions": _MINUTE, "executor": _MINUTE,
    "telemetry": _MINUTE,
}
# gRPC services every Corral service serves (health, reflection, WhoAmI): through the edge the
# router answers them, so `grpcurl <edge> list` shows the router's services.
SHARED_BY = "router"
API_KEY_PREFIX = "Bearer crl_"


@dataclass(frozen=True)
class Issuer:
    """An identity provider whose JWTs the edge verifies (the services verify them again)."""

    issuer: str
    audiences: tuple[str, ...]
    jwks_url: str
    # The claim naming the caller's tenant (as in the services' CORRAL_OIDC_ISSUERS): the
    # tenant's rate limit is keyed on it.
    tenant_claim: str = "tenant"


@dataclass(frozen=True)
class RateLimit:
    """Token buckets, refilled every `interval_s`: each credential (the whole `authorization`
    value) gets `burst` requests and `refill` more; each tenant named by a verified JWT
    `tenant_burst` and `tenant_refill`; `total_per_second` caps all requests through one Envoy."""

    burst: int = 100
    refill: int = 50
    tenant_burst: int = 500
    tenant_refill: int = 250
    interval_s: int = 1
    total_per_second: int = 5000
    # Distinct credentials (and tenants) with a live bucket; the least recently used are
    # forgotten beyond it.
    max_credentials: int = 10000


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str


@dataclass(frozen=True)
class Listener:
    name: str
    port: int
    tls: TlsFiles | None = None
    address: str = "0.0.0.0"


@dataclass(frozen=True)
class Edge:
    """Everything one generated config says besides the method table."""

    summary: str
    listeners: tuple[Listener, ...]
    # Service → (host, port) of its public listener.
    upstreams: Mapping[str, tuple[str, int]]
    # STATIC for IP addresses, STRICT_DNS for names (a headless Service resolves to every pod).
    upstream_type: str = "STATIC"
    issuers: tuple[Issuer, ...] = ()
    rate_limit: RateLimit = field(default_factory=RateLimit)
    admin_port: int = 9901


# --- the method table --------------------------------------------------------------------------


def is_public(access: Access) -> bool:
    return access.role is not None or access.any_principal or access.open


def cluster_of(method: str) -> str:
    """The Corral service that serves a method, "/pkg.Service/Method", by its proto package."""
    package = method.lstrip("/").split("/", 1)[0].rsplit(".", 1)[0]
    parts = package.split(".")
    if parts[0] == "corral" and parts[1] in SERVICES:
        return parts[1]
    if package.startswith("opentelemetry.proto.collector."):
        return "telemetry"
    return SHARED_BY


def routed(methods: Mapping[str, Access]) -> dict[str, str]:
    """Public method → the cluster it goes to."""
    return {m: cluster_of(m) for m, access in methods.items() if is_public(access)}


def refused(methods: Mapping[str, Access]) -> list[str]:
    """Internal methods: Envoy answers them itself."""
    return [m for m, access in methods.items() if not is_public(access)]


# --- rendering ---------------------------------------------------------------------------------


def flow(value: object) -> str:
    """A value as one line of YAML (JSON is YAML's flow style)."""
    return json.dumps(value, separators=(", ", ": "))


def _indent(lines: Sequence[str], spaces: int) -> str:
    return "\n".join(" " * spaces + line if line else "" for line in lines)


def render_routes(methods: Mapping[str, Access]) -> str:
    lines: list[str] = []
    service = ""
    for method, cluster in routed(methods).items():
        if method.rsplit("/", 1)[0] != service:
            service = method.rsplit("/", 1)[0]
            lines.append(f"# {service.lstrip('/')}: public")
        lines.append(f"- match: {flow({'path': method})}")
        limits = ROUTE_LIMITS[cluster] if cluster != SHARED_BY or method.startswith(
            "/corral.") else {"timeout": "0s"}
        lines.append(f"  route: {flow({'cluster': cluster, **limits})}")
    lines.append("# Internal methods: only Corral services call them, on their internal port.")
    for method in refused(methods):
        body = (f"{method.lstrip('/')} is internal to Corral: services call it on their "
                "internal port, never through the edge")
        lines.append(f"- match: {flow({'path': method})}")
        lines.append(f"  direct_response: {flow({'status': 403, 'body': {'inline_string': body}})}")
    lines.append("# Anything else: gRPC clients see UNIMPLEMENTED.")
    lines.append(f"- match: {flow({'prefix': '/'})}")
    body = "no public Corral method at this path"
    lines.append(f"  direct_response: {flow({'status': 404, 'body': {'inline_string': body}})}")
    return _indent(lines, 14)


def render_transport_socket(tls: TlsFiles | None) -> str:
    if tls is None:
        return ""
    context = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                 "DownstreamTlsContext",
        "common_tls_context": {
            "tls_certificates": [{"certificate_chain": {"filename": tls.cert},
                                  "private_key": {"filename": tls.key}}],
            "alpn_protocols": ["h2", "http/1.1"],
        },
    }
    # TLS only: a plaintext client's bytes are no handshake, and the connection is closed.
    socket = {"name": "envoy.transport_sockets.tls", "typed_config": context}
    return f"transport_socket: {flow(socket)}\n      "


def _issuer_name(index: int) -> str:
    return f"issuer_{index}"


def render_jwt_authn(issuers: Sequence[Issuer], methods: Mapping[str, Access]) -> str:
    if not issuers:
        return "          # jwt_authn: no identity provider configured (edge.toml); services verify."
    providers = {
        _issuer_name(i): {
            "issuer": iss.issuer,
            "audiences": list(iss.audiences),
            # The services verify the token again, so it travels on.
            "forward": True,
            # Read by local_reply_config, which answers every refused token UNAUTHENTICATED.
            "failed_status_in_metadata": "jwt_failure",
            # Read by the rate limit, which keys the tenant's bucket on a claim.
            "payload_in_metadata": "jwt_payload",
            "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
            "remote_jwks": {
                "http_uri": {"uri": iss.jwks_url, "cluster": f"jwks_{i}", "timeout": "5s"},
                "cache_duration": "300s",
                "async_fetch": {},
            },
        }
        for i, iss in enumerate(issuers)
    }
    names = list(providers)
    requires: dict[str, object] = (
        {"provider_name": names[0]} if len(names) == 1
        else {"requires_any": {"requirements": [{"provider_name": n} for n in names]}}
    )
    opened = [m for m, access in methods.items() if access.open]
    rules = [
        # API keys are opaque to Envoy: the services verify them.
        {"match": {"prefix": "/", "headers": [
            {"name": "authorization", "string_match": {"prefix": API_KEY_PREFIX}}]}},
        *({"match": {"path": m}} for m in opened),
        {"match": {"prefix": "/"}, "requires": requires},
    ]
    lines = [
        "# A first line: a JWT must verify against a configured issuer, audience and JWKS (the",
        "# services verify it again). `Bearer crl_…` API keys and open methods pass unverified.",
        "- name: envoy.filters.http.jwt_authn",
        "  typed_config:",
        ('    "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3'
        '.JwtAuthentication'),
        "    bypass_cors_preflight: true",
        "    providers:",
        *(f"      {name}: {flow(p)}" for name, p in providers.items()),
        "    rules:",
        *(f"    - {flow(rule)}" for rule in rules),
    ]
    return _indent(lines, 10)


def _bucket(max_tokens: int, tokens_per_fill: int, interval_s: int) -> dict[str, object]:
    return {"max_tokens": max_tokens, "tokens_per_fill": tokens_per_fill,
            "fill_interval": f"{interval_s}s"}


def render_rate_limit(limit: RateLimit, issuers: Sequence[Issuer]) -> str:
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    every = f"every {limit.interval_s}s"
    descriptors = [{"entries": [{"key": "credential"}],
                    "token_bucket": _bucket(limit.burst, limit.refill, limit.interval_s)}]
    actions: list[dict[str, object]] = [{"actions": [{"request_headers": {
        "header_name": "authorization", "descriptor_key": "credential"}}]}]
    if issuers:
        descriptors.append({"entries": [{"key": "tenant"}], "token_bucket": _bucket(
            limit.tenant_burst, limit.tenant_refill, limit.interval_s)})
        for claim in sorted({issuer.tenant_claim for issuer in issuers}):
            path = [{"key": "jwt_payload"}, {"key": claim}]
            actions.append({"actions": [{"metadata": {
                "descriptor_key": "tenant", "skip_if_absent": True,
                "metadata_key": {"key": "envoy.filters.http.jwt_authn", "path": path}}}]})
    lines = [
        f"# Each credential: {limit.burst} requests at once, {limit.refill} more {every}.",
        (f"# Each tenant of a verified JWT: {limit.tenant_burst}, {limit.tenant_refill} more "
        f"{every}. Everything: {limit.total_per_second}/s."),
        "# Over any, RESOURCE_EXHAUSTED. Buckets are per Envoy; set them in deploy/envoy/edge.toml.",
        "- name: envoy.filters.http.local_ratelimit",
        "  typed_config:",
        ('    "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3'
         '.LocalRateLimit'),
        "    stat_prefix: corral_edge_rate_limit",
        "    rate_limited_as_resource_exhausted: true",
        f"    filter_enabled: {flow({'runtime_key': 'corral_rate_limit_enabled', **always})}",
        f"    filter_enforced: {flow({'runtime_key': 'corral_rate_limit_enforced', **always})}",
        f"    token_bucket: {flow(_bucket(limit.total_per_second, limit.total_per_second, 1))}",
        f"    max_dynamic_descriptors: {limit.max_credentials}",
        "    # No value: one bucket per distinct credential or tenant (dynamic descriptors).",
        "    descriptors:",
        *(f"    - {flow(d)}" for d in descriptors),
        "    rate_limits:",
        *(f"    - {flow(a)}" for a in actions),
    ]
    return _indent(lines, 10)


def render_listener(listener: Listener, edge: Edge, methods: Mapping[str, Access]) -> str:
    template = Template((TEMPLATES / "listener.yaml").read_text())
    return template.substitute(
        name=listener.name,
        address=listener.address,
        port=listener.port,
        transport_socket=render_transport_socket(listener.tls),
        routes=render_routes(methods),
        jwt_authn=render_jwt_authn(edge.issuers, methods),
        rate_limit=render_rate_limit(edge.rate_limit, edge.issuers),
    ).rstrip("\n")


_HTTP2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "common_http_protocol_options": {"max_connection_duration": "600s"},
        "explicit_http_config": {"http2_protocol_options": {
            "connection_keepalive": {"interval": "30s", "timeout": "10s"}}},
    }
}
# no_traffic_interval: an idle cluster would otherwise be checked only once a minute.
_HEALTH = {"timeout": "2s", "interval": "5s", "no_traffic_interval": "5s",
           "unhealthy_threshold": 2, "healthy_threshold": 1, "grpc_health_check": {}}


def _endpoint(host: str, port: int) -> list[str]:
    return ["  endpoints:", "  - lb_endpoints:",
            (f"    - endpoint: {{ address: {{ socket_address: {{ address: {host}, port_value: "
            f"{port} }} }} }}")]


def render_service_cluster(service: str, host: str, port: int, kind: str) -> list[str]:
    lines = [f"- name: {service}", f"  type: {kind}", "  connect_timeout: 2s",
             "  lb_policy: ROUND_ROBIN"]
    if service == "router":
        # Every open Converse or InvokeStream holds one request; the default cap is 1024.
        lines.append("  circuit_breakers: " + flow({"thresholds": [
            {"max_connections": 10000, "max_pending_requests": 10000, "max_requests": 10000}]}))
    lines += [f"  typed_extension_protocol_options: {flow(_HTTP2)}",
              f"  health_checks: [{flow(_HEALTH)}]",
              "  load_assignment:", f"    cluster_name: {service}",
              *("  " + line for line in _endpoint(host, port))]
    return lines


def render_jwks_cluster(index: int, issuer: Issuer) -> list[str]:
    url = urlsplit(issuer.jwks_url)
    https = url.scheme == "https"
    host = url.hostname or ""
    port = url.port or (443 if https else 80)
    lines = [f"# The JWKS of {issuer.issuer}", f"- name: jwks_{index}", "  type: STRICT_DNS",
             "  connect_timeout: 5s", "  dns_lookup_family: V4_PREFERRED",
             "  load_assignment:", f"    cluster_name: jwks_{index}",
             *("  " + line for line in _endpoint(host, port))]
    if https:
        context = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                            "UpstreamTlsContext", "sni": host}
        lines.append("  transport_socket: " + flow(
            {"name": "envoy.transport_sockets.tls", "typed_config": context}))
    return lines


def render(edge: Edge, methods: Mapping[str, Access] = METHODS) -> str:
    clusters = sorted({cluster_of(m) for m in routed(methods)}, key=SERVICES.index)
    cluster_lines: list[str] = []
    for service in clusters:
        host, port = edge.upstreams[service]
        cluster_lines += render_service_cluster(service, host, port, edge.upstream_type)
    for index, issuer in enumerate(edge.issuers):
        cluster_lines += render_jwks_cluster(index, issuer)
    template = Template((TEMPLATES / "envoy.yaml").read_text())
    return template.substitute(
        summary=edge.summary,
        admin_port=edge.admin_port,
        listeners="\n".join(render_listener(x, edge, methods) for x in edge.listeners),
        clusters=_indent(cluster_lines, 2),
    )


# --- edge.toml ---------------------------------------------------------------------------------


class EdgeConfigError(ValueError):
    """edge.toml is malformed; the message names the table and key."""


def _table(doc: Mapping[str, object], key: str) -> Mapping[str, object]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise EdgeConfigError(f"edge.toml: [{key}] must be a table")
    return value


def _int(table: Mapping[str, object], key: str, default: int | None = None) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or value < 0:
        raise EdgeConfigError(f"edge.toml: {key} must be a whole number, not {value!r}")
    return value


def _str(table: Mapping[str, object], key: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise EdgeConfigError(f"edge.toml: {key} must be a string")
    return value


def _issuers(table: Mapping[str, object]) -> tuple[Issuer, ...]:
    entries = table.get("issuers", [])
    if not isinstance(entries, list):
        raise EdgeConfigError("edge.toml: issuers must be [[...issuers]] tables")
    issuers = []
    for entry in entries:
        audiences = entry.get("audiences")
        if not isinstance(audiences, list) or not audiences:
            raise EdgeConfigError("edge.toml: each issuer needs audiences = [\"...\"]")
        issuers.append(Issuer(_str(entry, "issuer"), tuple(str(a) for a in audiences),
                              _str(entry, "jwks_url"),
                              _str(entry, "tenant_claim") if "tenant_claim" in entry else "tenant"))
    return tuple(issuers)


def edges(doc: Mapping[str, object]) -> dict[str, Edge]:
    """File name → Edge, from edge.toml's [rate_limit], [production] and [local] tables."""
    limits = _table(doc, "rate_limit")
    default = RateLimit()
    limit = RateLimit(**{key: _int(limits, key, getattr(default, key))
                         for key in RateLimit.__dataclass_fields__})
    prod, local = _table(doc, "production"), _table(doc, "local")
    prod_tls = TlsFiles(_str(prod, "tls_cert"), _str(prod, "tls_key"))
    return {
        "envoy.yaml": Edge(
            summary=f"Production: TLS on :{_int(prod, 'port')}, dialing the Kubernetes Services "
                    "of deploy/k8s.",
            listeners=(Listener("corral_public", _int(prod, "port"), prod_tls),),
            upstreams={svc: (svc, port) for svc, port in DEFAULT_PORTS.items()},
            upstream_type="STRICT_DNS",
            issuers=_issuers(prod),
            rate_limit=limit,
        ),
        "envoy-local.yaml": Edge(
            summary=f"A developer machine: plaintext on :{_int(local, 'port')}, dialing "
                    "`make run`'s services on 127.0.0.1.",
            listeners=(Listener("corral_public", _int(local, "port")),),
            upstreams={svc: ("127.0.0.1", port) for svc, port in DEFAULT_PORTS.items()},
            issuers=_issuers(local),
            rate_limit=limit,
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="fail if a generated file differs from what it would be now")
    args = parser.parse_args(argv)
    stale = []
    for name, edge in edges(tomllib.loads(EDGE_TOML.read_text())).items():
        path = ENVOY_DIR / name
        text = render(edge)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    if stale:
        print(f"stale: {', '.join(stale)}; run `make envoy`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
