"""The real services behind the real Envoy, as a deployment runs them: a caller's JWT is checked by
Envoy and again by the services, an agent is invoked through the edge, internal methods never get
past it, and headers naming another tenant or principal change nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from corral.identity.v1 import identity_pb2, identity_pb2_grpc
from corral.router.v1 import router_pb2 as rt
from corral.router.v1 import router_pb2_grpc
from corral.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from scripts.genenvoy import Edge, Issuer, Listener
from services.common.auth.assertions import ASSERTION_KEY
from services.common.settings import SERVICES
from tests import credentials
from tests.edge import running_envoy
from tests.harness import Platform
from tests.mesh import Mesh, connect
from tests.rpc import Metadata, fails, new_tenant, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

AGENT = """
from corral.sdk import App

app = App()


@app.entrypoint
def run(payload, ctx):
    return "through the edge"
"""


@dataclass
class Edged:
    mesh: Mesh
    channel: grpc.aio.Channel

    async def whoami(self, metadata: Metadata) -> identity_pb2.WhoAmIResponse:
        stub = identity_pb2_grpc.IdentityServiceStub(self.channel)
        return await stub.WhoAmI(identity_pb2.WhoAmIRequest(), metadata=metadata)


@contextmanager
def envoy_before(settings_addrs: dict[str, str], directory: Path) -> Iterator[int]:
    """Envoy in front of the services at `settings_addrs`, verifying the run's tokens."""
    issuer = credentials.issuer()
    config = json.loads(credentials.issuers_setting())[0]
    upstreams = {}
    for svc in SERVICES:
        host, _, port = settings_addrs[svc].rpartition(":")
        upstreams[svc] = (host, int(port))
    edge = Edge(
        summary="test: the in-process mesh",
        listeners=(Listener("plain", 0, address="127.0.0.1"),),
        upstreams=upstreams,
        issuers=(Issuer(issuer.issuer, (config["audience"],), issuer.jwks_url),),
        admin_port=0,
    )
    with running_envoy(edge, directory) as ports:
        yield ports["plain"]


@pytest_asyncio.fixture
async def edged(services: Platform, tmp_path: Path) -> AsyncIterator[Edged]:
    hosts = await services.start(*("telemetry", "sessions", "registry", "executor", "router"))
    async with connect(services.settings, hosts, tmp_path) as mesh:
        with envoy_before(dict(services.settings.addrs), tmp_path) as port:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield Edged(mesh, channel)


async def test_a_token_is_checked_at_the_edge_and_by_the_service_behind_it(edged: Edged) -> None:
    tenant = new_tenant()
    me = await edged.whoami(who(tenant, "ada", "operator"))
    assert (me.tenant, me.subject, list(me.roles), me.credential_kind) == (
        tenant, "ada", ["operator"], "jwt"
    )
    # Envoy refuses a token for another audience before any service sees it.
    wrong = credentials.issuer().mint(tenant, "ada", roles=("admin",), audience="someone-else")
    await fails(grpc.StatusCode.UNAUTHENTICATED,
                edged.whoami((("authorization", f"Bearer {wrong}"),)))
    # And the services refuse a call without a credential that Envoy let through (open routes
    # are only health and reflection; WhoAmI needs one).
    await fails(grpc.StatusCode.UNAUTHENTICATED, edged.whoami(()))


async def test_headers_naming_another_tenant_or_principal_change_nothing(edged: Edged) -> None:
    mine, victim = new_tenant(), new_tenant()
    forged = (
        *who(mine, "mallory", "viewer"),
        ("x-corral-tenant", victim),
        ("x-corral-user", "root"),
        (ASSERTION_KEY, "eyJhbGciOiJFUzI1NiJ9.e30.c2ln"),
    )
    me = await edged.whoami(forged)
    assert (me.tenant, me.subject, list(me.roles)) == (mine, "mallory", ["viewer"])


async def test_an_agent_is_invoked_through_the_edge(edged: Edged) -> None:
    agent = await edged.mesh.publish_agent("edge", AGENT)
    router = router_pb2_grpc.RouterServiceStub(edged.channel)
    answer = await router.Invoke(
        rt.InvokeRequest(agent=f"agents/{agent}", payload=b"{}"), metadata=edged.mesh.me
    )
    assert answer.output == b"through the edge"
    # Another tenant reaching the same router through the same edge finds no such agent.
    await fails(grpc.StatusCode.NOT_FOUND, router.Invoke(
        rt.InvokeRequest(agent=f"agents/{agent}", payload=b"{}"), metadata=who(new_tenant())))


async def test_internal_methods_never_get_past_the_edge(edged: Edged) -> None:
    sessions = sessions_pb2_grpc.SessionsServiceStub(edged.channel)
    err = await fails(grpc.StatusCode.PERMISSION_DENIED, sessions.CommitTurn(
        sessions_pb2.CommitTurnRequest(session="sessions/x", lease_id="l", etag="e"),
        metadata=edged.mesh.me))
    assert "internal" in (err.details() or "")
