"""Tenancy in the registry as two tenants see it: the same agent name in each is two agents, and
nothing of one tenant's (agents, versions, bundles, endpoints, rollouts, tools, audit events) can
be read or changed by the other, which is told NOT_FOUND, as for a name nobody has."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2

from corral.registry.v1 import registry_pb2 as pb
from corral.registry.v1 import registry_pb2_grpc, rollouts_pb2_grpc, tools_pb2_grpc
from corral.registry.v1 import rollouts_pb2 as ro
from corral.registry.v1 import tools_pb2 as tl
from services.common.auth.interceptor import TENANT_KEY
from services.common.settings import Settings
from tests.bundles import packed_agent, publish_requests
from tests.credentials import internal_channel, principal_of
from tests.rpc import Metadata, described, error_details, fails, new_tenant, who
from tests.tool_registry import SECRET, registry_with_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def tenant_of(md: Metadata) -> str:
    return principal_of(md).tenant


@dataclass
class AsService:
    """A Corral service's call, on the registry's internal listener with its certificate: for
    every tenant, or acting in `tenant`."""

    name: str
    tenant: str = ""

    @property
    def metadata(self) -> Metadata:
        return ((TENANT_KEY, self.tenant),) if self.tenant else ()


def service(name: str, tenant: str = "") -> AsService:
    return AsService(name, tenant)


@dataclass
class Tenants:
    registry: registry_pb2_grpc.RegistryServiceAsyncStub
    rollouts: rollouts_pb2_grpc.RolloutServiceAsyncStub
    tools: tools_pb2_grpc.ToolServiceAsyncStub
    tmp: Path
    # One agent name, published in both tenants.
    agent: str
    a: Metadata
    b: Metadata
    settings: Settings

    def stub(self, caller: Metadata | AsService) -> tuple[registry_pb2_grpc.RegistryServiceAsyncStub, Metadata]:
        """The stub and metadata of a call by `caller`: a user on the public port, or a service."""
        if not isinstance(caller, AsService):
            return self.registry, caller
        channel = internal_channel(self.settings, "registry", caller.name)
        return registry_pb2_grpc.RegistryServiceStub(channel), caller.metadata

    async def publish(self, md: Metadata, prompt: str) -> pb.Version:
        data = packed_agent(self.tmp, self.agent, prompt=prompt)
        return await self.registry.PublishVersion(iter(publish_requests(data)), metadata=md)  # type: ignore[arg-type]

    async def numbers(self, md: Metadata) -> list[int]:
        listed = await self.registry.ListVersions(
            pb.ListVersionsRequest(parent=f"agents/{self.agent}"), metadata=md)
        return [v.number for v in listed.versions]

    def endpoint_body(self, endpoint: str, version: int) -> pb.Endpoint:
        return pb.Endpoint(
            name=f"agents/{self.agent}/endpoints/{endpoint}",
            traffic=[pb.TrafficTarget(version=f"agents/{self.agent}/versions/{version}", percent=100)],
        )


@pytest_asyncio.fixture
async def tenants(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Tenants]:
    async with registry_with_key(database_url, redis_url, tmp_path) as (settings, channel):
        yield Tenants(
            registry_pb2_grpc.RegistryServiceStub(channel),
            rollouts_pb2_grpc.RolloutServiceStub(channel),
            tools_pb2_grpc.ToolServiceStub(channel),
            tmp_path,
            f"t-{uuid.uuid4().hex[:10]}",
            who(new_tenant(), "alice"),
            who(new_tenant(), "bob"),
            settings,
        )


async def test_the_same_agent_name_in_two_tenants_is_two_agents(tenants: Tenants) -> None:
    t = tenants
    in_a = await t.publish(t.a, "A's agent\n")
    await t.publish(t.b, "B's first\n")
    in_b = await t.publish(t.b, "B's second\n")
    assert in_a.name == f"agents/{t.agent}/versions/1" and in_b.number == 2
    assert (await t.numbers(t.a), await t.numbers(t.b)) == ([1], [1, 2])

    # The same bytes published in the other tenant are a version of that tenant's agent too.
    again = await t.publish(t.b, "A's agent\n")
    assert again.number == 3 and again.digest == in_a.digest
    assert await t.numbers(t.a) == [1]

    for md, latest, version in ((t.a, 1, 1), (t.b, 3, 3)):
        agent = await t.registry.GetAgent(pb.GetAgentRequest(name=f"agents/{t.agent}"), metadata=md)
        assert agent.latest_version == f"agents/{t.agent}/versions/{latest}"
        default = await t.registry.GetEndpoint(
            pb.GetEndpointRequest(name=f"agents/{t.agent}/endpoints/DEFAULT"), metadata=md)
        assert [tr.version for tr in default.traffic] == [f"agents/{t.agent}/versions/{version}"]
        assert default.tenant == tenant_of(md)
        listed = await t.registry.ListAgents(pb.ListAgentsRequest(page_size=100), metadata=md)
        assert [a.name for a in listed.agents] == [f"agents/{t.agent}"]


async def test_another_tenants_resources_are_not_found(tenants: Tenants) -> None:
    t = tenants
    await t.publish(t.a, "v1\n")
    v2 = await t.publish(t.a, "v2\n")
    await t.registry.UpdateEndpoint(
        pb.UpdateEndpointRequest(endpoint=t.endpoint_body("prod", 1), allow_missing=True),
        metadata=t.a)
    prod = f"agents/{t.agent}/endpoints/prod"
    rollout = await t.rollouts.CreateRollout(ro.CreateRolloutRequest(
        parent=prod,
        rollout=ro.Rollout(candidate_version=v2.name, steps=[
            ro.RolloutStep(set_weight=10), ro.RolloutStep(manual=ro.ManualGate()),
            ro.RolloutStep(set_weight=100),
        ]),
    ), metadata=t.a)

    async def download() -> None:
        request = pb.DownloadVersionRequest(name=v2.name)
        async for _ in t.registry.DownloadVersion(request, metadata=t.b):
            pass

    agent = f"agents/{t.agent}"
    calls: dict[str, Awaitable[object]] = {
        "GetAgent": t.registry.GetAgent(pb.GetAgentRequest(name=agent), metadata=t.b),
        "ListVersions": t.registry.ListVersions(pb.ListVersionsRequest(parent=agent), metadata=t.b),
        "GetVersion": t.registry.GetVersion(pb.GetVersionRequest(name=v2.name), metadata=t.b),
        "GetVersion by digest": t.registry.GetVersion(
            pb.GetVersionRequest(name=f"{agent}/versions/{v2.digest}"), metadata=t.b),
        "DownloadVersion": download(),
        "GetEndpoint": t.registry.GetEndpoint(pb.GetEndpointRequest(name=prod), metadata=t.b),
        "ListEndpoints": t.registry.ListEndpoints(pb.ListEndpointsRequest(parent=agent), metadata=t.b),
        "UpdateEndpoint": t.registry.UpdateEndpoint(
            pb.UpdateEndpointRequest(endpoint=t.endpoint_body("prod", 2)), metadata=t.b),
        "UpdateEndpoint allow_missing": t.registry.UpdateEndpoint(
            pb.UpdateEndpointRequest(endpoint=t.endpoint_body("prod", 2), allow_missing=True),
            metadata=t.b),
        "CreateEndpoint": t.registry.CreateEndpoint(pb.CreateEndpointRequest(
            parent=agent, endpoint_id="staging", endpoint=t.endpoint_body("staging", 1)), metadata=t.b),
        "CreateRollout": t.rollouts.CreateRollout(ro.CreateRolloutRequest(
            parent=prod, rollout=ro.Rollout(candidate_version=v2.name,
                                            steps=[ro.RolloutStep(set_weight=100)])), metadata=t.b),
        "GetRollout": t.rollouts.GetRollout(ro.GetRolloutRequest(name=rollout.name), metadata=t.b),
        "PromoteRollout": t.rollouts.PromoteRollout(
            ro.PromoteRolloutRequest(name=rollout.name, full=True), metadata=t.b),
        "PauseRollout": t.rollouts.PauseRollout(ro.PauseRolloutRequest(name=rollout.name), metadata=t.b),
        "AbortRollout": t.rollouts.AbortRollout(ro.AbortRolloutRequest(name=rollout.name), metadata=t.b),
        "RollbackEndpoint": t.rollouts.RollbackEndpoint(
            ro.RollbackEndpointRequest(name=prod, version=f"{agent}/versions/1"), metadata=t.b),
    }
    for method, call in calls.items():
        err = await fails(grpc.StatusCode.NOT_FOUND, call)
        assert t.agent in (err.details() or ""), method
    listed = await t.rollouts.ListRollouts(ro.ListRolloutsRequest(parent=prod), metadata=t.b)
    assert not listed.rollouts

    # A's agent, endpoint and rollout are as A left them.
    assert await t.numbers(t.a) == [1, 2]
    still = await t.rollouts.GetRollout(ro.GetRolloutRequest(name=rollout.name), metadata=t.a)
    assert still.state in (ro.ROLLOUT_STATE_PROGRESSING, ro.ROLLOUT_STATE_PAUSED)
    assert not (await t.registry.ListAgents(pb.ListAgentsRequest(), metadata=t.b)).agents


async def test_bundles_go_to_their_tenant_and_to_executors_only(tenants: Tenants) -> None:
    t = tenants
    version = await t.publish(t.a, "v1\n")
    by_digest = f"agents/{t.agent}/versions/{version.digest}"

    async def download(name: str, caller: Metadata | AsService) -> bytes:
        stub, md = t.stub(caller)
        request = pb.DownloadVersionRequest(name=name)
        return b"".join([m.chunk async for m in stub.DownloadVersion(request, metadata=md)])

    mine = await download(version.name, t.a)
    assert mine and await download(by_digest, service("executor")) == mine
    assert await download(version.name, service("executor", tenant_of(t.a))) == mine
    # Another service has no use for agent code, even acting in the tenant.
    await fails(grpc.StatusCode.PERMISSION_DENIED,
                download(version.name, service("router", tenant_of(t.a))))
    # For every tenant, a number names no one version: the executor names the digest.
    err = await fails(grpc.StatusCode.INVALID_ARGUMENT, download(version.name, service("executor")))
    assert error_details(err)[1] == ["name"]


async def test_the_watch_shows_a_tenant_its_own_endpoints_and_a_service_every_tenants(
    tenants: Tenants,
) -> None:
    t = tenants
    await t.publish(t.a, "A\n")
    await t.publish(t.b, "B\n")
    default = f"agents/{t.agent}/endpoints/DEFAULT"

    async def snapshot(caller: Metadata | AsService) -> list[tuple[str, str]]:
        stub, md = t.stub(caller)
        call = stub.WatchEndpoints(pb.WatchEndpointsRequest(), metadata=md)
        try:
            message = await call.read()
        finally:
            call.cancel()
        assert isinstance(message, pb.WatchEndpointsResponse) and message.snapshot
        return sorted((e.tenant, e.name) for e in message.endpoints if e.name == default)

    tenant_a, tenant_b = tenant_of(t.a), tenant_of(t.b)
    assert await snapshot(t.a) == [(tenant_a, default)]
    assert await snapshot(t.b) == [(tenant_b, default)]
    assert await snapshot(service("router")) == sorted([(tenant_a, default), (tenant_b, default)])


async def test_the_audit_log_is_per_tenant(tenants: Tenants) -> None:
    t = tenants
    await t.publish(t.a, "A\n")
    await t.publish(t.b, "B\n")
    await t.registry.UpdateEndpoint(
        pb.UpdateEndpointRequest(endpoint=t.endpoint_body("prod", 1), allow_missing=True),
        metadata=t.b)
    prefix = f"agents/{t.agent}/"
    for md, methods in ((t.a, ["PublishVersion"]), (t.b, ["UpdateEndpoint", "PublishVersion"])):
        events = (await t.registry.ListAuditEvents(
            pb.ListAuditEventsRequest(resource_prefix=prefix), metadata=md)).events
        assert [e.method for e in events] == methods
        assert {(e.tenant, e.user) for e in events} == {(tenant_of(md), described(md))}


async def test_a_tool_is_its_tenants_and_its_secret_never_follows_it_elsewhere(
    tenants: Tenants,
) -> None:
    t = tenants
    created = await t.tools.CreateTool(tl.CreateToolRequest(tool_id="search", tool=tl.Tool(
        kind=tl.TOOL_KIND_HTTP, address="https://search.example.com/v1", secret=SECRET,
    )), metadata=t.a)
    assert created.has_secret
    moved = tl.Tool(name="tools/search", address="https://elsewhere.example.net/collect")
    address_only = field_mask_pb2.FieldMask(paths=["address"])

    for call in (
        t.tools.GetTool(tl.GetToolRequest(name="tools/search"), metadata=t.b),
        t.tools.UpdateTool(tl.UpdateToolRequest(tool=moved, update_mask=address_only), metadata=t.b),
        t.tools.DeleteTool(tl.DeleteToolRequest(name="tools/search"), metadata=t.b),
    ):
        await fails(grpc.StatusCode.NOT_FOUND, call)
    assert not (await t.tools.ListTools(tl.ListToolsRequest(), metadata=t.b)).tools

    # A new address without a new secret is refused, naming the secret; nothing changes.
    err = await fails(grpc.StatusCode.INVALID_ARGUMENT, t.tools.UpdateTool(
        tl.UpdateToolRequest(tool=moved, update_mask=address_only), metadata=t.a))
    assert error_details(err)[1] == ["tool.secret"]
    kept = await t.tools.GetTool(tl.GetToolRequest(name="tools/search"), metadata=t.a)
    assert kept.address == created.address and kept.etag == created.etag and kept.has_secret

    # With a secret for the new address, or an empty one that removes it, the move is allowed.
    with_secret = tl.Tool(name="tools/search", address=moved.address, secret="sk-new-" + "1" * 20)
    both = field_mask_pb2.FieldMask(paths=["address", "secret"])
    updated = await t.tools.UpdateTool(
        tl.UpdateToolRequest(tool=with_secret, update_mask=both), metadata=t.a)
    assert updated.address == moved.address and updated.has_secret
    back = tl.Tool(name="tools/search", address=created.address)
    cleared = await t.tools.UpdateTool(
        tl.UpdateToolRequest(tool=back, update_mask=both), metadata=t.a)
    assert cleared.address == created.address and not cleared.has_secret
    # A tool without a secret moves freely.
    free = await t.tools.UpdateTool(
        tl.UpdateToolRequest(tool=moved, update_mask=address_only), metadata=t.a)
    assert free.address == moved.address
