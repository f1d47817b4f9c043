"""The edge: the real Envoy running a config generated from the method table routes only public
methods, refuses bad JWTs itself, passes API keys on, strips Corral's own headers, requires TLS on
its TLS listener and limits each credential's rate."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corral.client import CorralClient
from corral.profiles import ConnectionOptions, client_config
from corral.registry.v1 import registry_pb2 as reg
from scripts.genenvoy import (
    Edge,
    Issuer,
    Listener,
    RateLimit,
    TlsFiles,
    cluster_of,
    refused,
    routed,
)
from services.common.auth.methods import METHODS
from services.common.settings import SERVICES
from tests.edge import LocalJwtIssuer, Upstreams, running_envoy, self_signed

BURST = 4
TENANT_BURST = 6


@dataclass
class World:
    upstreams: Upstreams
    issuer: LocalJwtIssuer
    plain: grpc.Channel
    plain_port: int
    tls_port: int
    ca_file: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("edge")
    upstreams = Upstreams()
    upstreams.start(SERVICES)
    issuer = LocalJwtIssuer()
    cert, key = self_signed(directory)
    edge = Edge(
        summary="test",
        listeners=(Listener("plain", 0, address="127.0.0.1"),
                   Listener("tls", 0, TlsFiles(str(cert), str(key)), address="127.0.0.1")),
        upstreams={svc: ("127.0.0.1", port) for svc, port in upstreams.ports.items()},
        issuers=(Issuer(issuer.issuer, (issuer.audience,), issuer.jwks_url),),
        rate_limit=RateLimit(burst=BURST, refill=1, tenant_burst=TENANT_BURST, tenant_refill=1,
                             interval_s=3600, total_per_second=10000),
        admin_port=0,
    )
    try:
        with running_envoy(edge, directory) as ports, grpc.insecure_channel(
            f"127.0.0.1:{ports['plain']}"
        ) as plain:
            yield World(upstreams, issuer, plain, ports["plain"], ports["tls"], cert)
    finally:
        issuer.close()
        upstreams.stop()


def api_key() -> str:
    return f"crl_{uuid.uuid4().hex}"


def call(channel: grpc.Channel, method: str, credential: str | None = None,
         *headers: tuple[str, str]) -> bytes:
    metadata = ((("authorization", f"Bearer {credential}"),) if credential else ()) + headers
    answer: bytes = channel.unary_unary(method)(b"", metadata=metadata, timeout=10)
    return answer


def refused_with(code: grpc.StatusCode, channel: grpc.Channel, method: str,
                 credential: str | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(channel, method, credential)
    assert info.value.code() == code, f"{method}: {info.value.code()} {info.value.details()}"
    return info.value


INVOKE = "/corral.router.v1.RouterService/Invoke"
LIST_AGENTS = "/corral.registry.v1.RegistryService/ListAgents"


def test_every_public_method_reaches_the_service_that_serves_it(world: World) -> None:
    methods = [m for m in routed(METHODS) if not m.startswith("/grpc.")]
    assert INVOKE in methods and "/corral.identity.v1.IdentityService/WhoAmI" in methods
    for method in methods:
        credential = None if METHODS[method].open else api_key()
        call(world.plain, method, credential)
        reached = world.upstreams.reached(method)
        assert [c.service for c in reached][-1:] == [cluster_of(method)], method


def test_internal_methods_are_refused_by_the_edge_and_never_reach_a_service(world: World) -> None:
    internal = refused(METHODS)
    assert "/corral.executor.v1.ExecutorService/Execute" in internal
    assert "/corral.registry.v1.ToolSecretsService/ResolveTool" in internal
    for method in internal:
        err = refused_with(grpc.StatusCode.PERMISSION_DENIED, world.plain, method, api_key())
        assert "internal" in (err.details() or "")
        assert world.upstreams.reached(method) == []


def test_a_path_that_is_no_public_method_is_unimplemented(world: World) -> None:
    for path in ("/corral.executor.v1.ExecutorService/Nope", "/corral.router.v1.RouterService/",
                 "/admin/config_dump"):
        refused_with(grpc.StatusCode.UNIMPLEMENTED, world.plain, path, api_key())
        assert world.upstreams.reached(path) == []


def test_health_answers_without_a_credential(world: World) -> None:
    stub = health_pb2_grpc.HealthStub(world.plain)
    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_a_valid_jwt_passes_and_travels_on_for_the_service_to_verify(world: World) -> None:
    token = world.issuer.token()
    call(world.plain, LIST_AGENTS, token)
    assert world.upstreams.reached(LIST_AGENTS)[-1].metadata["authorization"] == f"Bearer {token}"


@pytest.mark.parametrize("why", ["missing", "expired", "wrong audience", "wrong issuer",
                                 "wrong key", "not a jwt"])
def test_the_edge_refuses_a_bad_jwt_before_any_service(world: World, why: str) -> None:
    issuer = world.issuer
    credential = {
        "missing": None,
        "expired": issuer.token(expires_in=-3600),
        "wrong audience": issuer.token(aud="someone-else"),
        "wrong issuer": issuer.token(iss="https://elsewhere.test/"),
        "wrong key": issuer.token(key=rsa.generate_private_key(public_exponent=65537,
                                                               key_size=2048)),
        "not a jwt": "definitely.not.ajwt",
    }[why]
    before = len(world.upstreams.reached(INVOKE))
    refused_with(grpc.StatusCode.UNAUTHENTICATED, world.plain, INVOKE, credential)
    assert len(world.upstreams.reached(INVOKE)) == before


def test_an_api_key_passes_unverified_for_the_services_to_check(world: World) -> None:
    key = api_key()
    call(world.plain, INVOKE, key)
    assert world.upstreams.reached(INVOKE)[-1].metadata["authorization"] == f"Bearer {key}"


def test_corral_headers_a_client_sends_never_reach_a_service(world: World) -> None:
    key = api_key()
    forged = (("x-corral-tenant", "victim"), ("x-corral-user", "root"),
              ("x-corral-principal", "forged-assertion"), ("x-corral-anything", "x"))
    call(world.plain, INVOKE, key, *forged, ("x-request-note", "kept"))
    seen = world.upstreams.reached(INVOKE)[-1].metadata
    assert seen["authorization"] == f"Bearer {key}"
    assert seen["x-request-note"] == "kept"
    assert not [k for k in seen if k.startswith("x-corral-")]


def test_the_tls_listener_speaks_only_tls(world: World) -> None:
    address = f"localhost:{world.tls_port}"
    credentials = grpc.ssl_channel_credentials(root_certificates=world.ca_file.read_bytes())
    key = api_key()
    with grpc.secure_channel(address, credentials) as channel:
        call(channel, LIST_AGENTS, key)
    assert world.upstreams.reached(LIST_AGENTS)[-1].metadata["authorization"] == f"Bearer {key}"
    with grpc.insecure_channel(address) as channel:
        refused_with(grpc.StatusCode.UNAVAILABLE, channel, LIST_AGENTS, api_key())


def test_each_credential_has_its_own_rate_limit(world: World) -> None:
    key, other = api_key(), api_key()
    for _ in range(BURST):
        call(world.plain, LIST_AGENTS, key)
    err = refused_with(grpc.StatusCode.RESOURCE_EXHAUSTED, world.plain, LIST_AGENTS, key)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    call(world.plain, LIST_AGENTS, other)


def test_the_corral_client_reaches_a_platform_over_tls_with_the_profiles_ca(
    world: World, tmp_path: Path
) -> None:
    (tmp_path / "config.toml").write_text(
        f'[profiles.edge]\naddress = "localhost:{world.tls_port}"\nca = "{world.ca_file}"\n')
    options = ConnectionOptions(profile="edge")
    config = client_config(options, {"CORRAL_CONFIG": str(tmp_path / "config.toml")})
    assert config.tls and set(config.addrs.values()) == {f"localhost:{world.tls_port}"}
    key = api_key()
    client = CorralClient(config)
    try:
        client.registry.ListAgents(reg.ListAgentsRequest(), timeout=10,
                                   metadata=(("authorization", f"Bearer {key}"),))
        # Without the CA, the edge's certificate is not trusted.
        untrusted = CorralClient(client_config(
            ConnectionOptions(address=f"localhost:{world.tls_port}", tls=True),
            {"CORRAL_CONFIG": str(tmp_path / "none.toml")}))
        with pytest.raises(grpc.RpcError) as info:
            untrusted.registry.ListAgents(reg.ListAgentsRequest(), timeout=10,
                                          metadata=(("authorization", f"Bearer {key}"),))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        untrusted.close()
    finally:
        client.close()
    reached = world.upstreams.reached(LIST_AGENTS)
    assert [c.metadata["authorization"] for c in reached].count(f"Bearer {key}") == 1


def test_each_tenant_of_a_jwt_has_its_own_rate_limit(world: World) -> None:
    busy, calm = f"busy-{uuid.uuid4().hex[:6]}", f"calm-{uuid.uuid4().hex[:6]}"
    # Every token is a credential of its own: only the tenant's bucket runs out.
    for _ in range(TENANT_BURST):
        call(world.plain, LIST_AGENTS, world.issuer.token(tenant=busy))
    refused_with(grpc.StatusCode.RESOURCE_EXHAUSTED, world.plain, LIST_AGENTS,
                 world.issuer.token(tenant=busy))
    call(world.plain, LIST_AGENTS, world.issuer.token(tenant=calm))


def test_browsers_over_grpc_web_meet_the_same_edge(world: World) -> None:
    frame = b"\x00\x00\x00\x00\x00"  # one empty message
    headers = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1",
               "authorization": f"Bearer {api_key()}", "x-corral-tenant": "victim"}
    with httpx.Client(base_url=f"http://127.0.0.1:{world.plain_port}", timeout=10) as web:
        internal = web.post("/corral.executor.v1.ExecutorService/Execute", content=frame,
                            headers=headers)
        public = web.post(LIST_AGENTS, content=frame, headers=headers)
    assert internal.headers["grpc-status"] == str(grpc.StatusCode.PERMISSION_DENIED.value[0])
    assert world.upstreams.reached("/corral.executor.v1.ExecutorService/Execute") == []
    assert public.status_code == 200 and b"grpc-status:0" in public.content.replace(b" ", b"")
    assert "x-corral-tenant" not in world.upstreams.reached(LIST_AGENTS)[-1].metadata
