"""Deleting agents, versions and endpoints, and retention, against a real registry and sessions
service on PostgreSQL: each refusal names what blocks it, what is deleted is gone (NOT_FOUND,
not listed), bundles go only when no version of any tenant has them, another tenant cannot
delete, and retention (with a clock the test controls) deletes only unused versions."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
import pytest_asyncio

from corral.bundle import digest_of, inspect
from corral.names import AgentRef
from corral.registry.v1 import registry_pb2 as pb
from corral.registry.v1 import registry_pb2_grpc, rollouts_pb2_grpc
from corral.registry.v1 import rollouts_pb2 as ro
from corral.sessions.v1 import sessions_pb2 as ses
from corral.sessions.v1 import sessions_pb2_grpc
from services.registry.clients import SessionsClient
from services.registry.lifecycle import Lifecycle
from services.registry.model import VersionState
from services.registry.store import PgStore
from services.registry.tenancy import acting_for
from tests import harness
from tests.bundles import packed_agent, publish_requests
from tests.credentials import principal_of, public_channel
from tests.fakes.common import FakeClock
from tests.rpc import Metadata, described, error_details, fails, new_tenant, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@dataclass
class World:
    """A registry and a sessions service, a tenant of the test's own and an agent in it."""

    platform: harness.Platform
    registry: registry_pb2_grpc.RegistryServiceAsyncStub
    rollouts: rollouts_pb2_grpc.RolloutServiceAsyncStub
    sessions: sessions_pb2_grpc.SessionsServiceAsyncStub
    tmp: Path
    agent: str
    me: Metadata

    def bundle(self, n: int, agent: str = "") -> bytes:
        return packed_agent(self.tmp / f"b{n}", agent or self.agent, prompt=f"Version {n}.\n")

    async def publish(self, data: bytes, metadata: Metadata | None = None) -> pb.Version:
        return await self.registry.PublishVersion(
            iter(publish_requests(data)), metadata=metadata or self.me)

    async def publish_n(self, count: int) -> list[pb.Version]:
        return [await self.publish(self.bundle(n)) for n in range(1, count + 1)]

    def version(self, n: int) -> str:
        return f"agents/{self.agent}/versions/{n}"

    def endpoint_name(self, endpoint: str) -> str:
        return f"agents/{self.agent}/endpoints/{endpoint}"

    async def route(self, endpoint: str, version: int) -> pb.Endpoint:
        return await self.registry.UpdateEndpoint(pb.UpdateEndpointRequest(
            endpoint=pb.Endpoint(name=self.endpoint_name(endpoint), traffic=[
                pb.TrafficTarget(version=self.version(version), percent=100)]),
            allow_missing=True,
        ), metadata=self.me)

    async def pin_session(self, version: pb.Version) -> ses.Session:
        return await self.sessions.CreateSession(ses.CreateSessionRequest(session=ses.Session(
            agent=f"agents/{self.agent}", version=version.name, version_digest=version.digest,
        )), metadata=self.me)

    async def versions(self) -> list[int]:
        listed = await self.registry.ListVersions(
            pb.ListVersionsRequest(parent=f"agents/{self.agent}"), metadata=self.me)
        return [v.number for v in listed.versions]

    async def delete_version(self, n: int, metadata: Metadata | None = None) -> None:
        await self.registry.DeleteVersion(
            pb.DeleteVersionRequest(name=self.version(n)), metadata=metadata or self.me)

    async def bundle_stored(self, digest: str) -> bool:
        conn = await asyncpg.connect(self.platform.settings.database_url)
        try:
            return bool(await conn.fetchval(
                "SELECT count(*) FROM registry.bundles WHERE digest = $1", digest))
        finally:
            await conn.close()


@pytest_asyncio.fixture
async def world(services: harness.Platform, tmp_path: Path) -> AsyncIterator[World]:
    # Telemetry: the registry's controller analyses the experiments a test starts.
    await services.start("telemetry", "sessions", "registry")
    registry = public_channel(services.settings.addrs["registry"])
    sessions = public_channel(services.settings.addrs["sessions"])
    try:
        yield World(
            services, registry_pb2_grpc.RegistryServiceStub(registry),
            rollouts_pb2_grpc.RolloutServiceStub(registry), sessions_pb2_grpc.SessionsServiceStub(sessions), tmp_path,
            f"a-{uuid.uuid4().hex[:10]}", who(new_tenant()),
        )
    finally:
        await registry.close()
        await sessions.close()


async def test_deleting_a_version_is_refused_while_anything_uses_it_naming_what(world: World) -> None:
    versions = await world.publish_n(4)  # DEFAULT serves 4 and keeps 3 for rollback
    await world.route("prod", 1)
    session = await world.pin_session(versions[1])

    err = await fails(FAILED_PRECONDITION, world.delete_version(1))
    info, _ = error_details(err)
    assert info.reason == "VERSION_IN_USE"
    assert f"{world.endpoint_name('prod')} (traffic)" in (err.details() or "")
    assert info.metadata["endpoints"] == f"{world.endpoint_name('prod')} (traffic)"

    err = await fails(FAILED_PRECONDITION, world.delete_version(2))
    info, _ = error_details(err)
    assert (info.reason, info.metadata["sessions"]) == ("VERSION_IN_USE", "1")
    assert "1 active sessions" in (err.details() or "")

    for n, why in ((3, "rollback_version"), (4, "traffic")):
        err = await fails(FAILED_PRECONDITION, world.delete_version(n))
        assert f"{world.endpoint_name('DEFAULT')} ({why})" in error_details(err)[0].metadata["endpoints"]

    # Stopped, the session no longer holds its version: it can go.
    await world.sessions.StopSession(ses.StopSessionRequest(name=session.name), metadata=world.me)
    await world.delete_version(2)
    assert await world.versions() == [1, 3, 4]
    await fails(NOT_FOUND, world.registry.GetVersion(
        pb.GetVersionRequest(name=world.version(2)), metadata=world.me))
    await fails(NOT_FOUND, world.delete_version(2))
    audit = await world.registry.ListAuditEvents(
        pb.ListAuditEventsRequest(resource_prefix=world.version(2)), metadata=world.me)
    newest = audit.events[0]
    assert (newest.method, newest.user) == ("DeleteVersion", described(world.me))

    # A digest is not a version number here.
    err = await fails(grpc.StatusCode.INVALID_ARGUMENT, world.registry.DeleteVersion(
        pb.DeleteVersionRequest(name=f"agents/{world.agent}/versions/{versions[0].digest}"),
        metadata=world.me))
    assert error_details(err)[1] == ["name"]


async def test_a_running_experiment_keeps_its_versions_and_endpoint(world: World) -> None:
    await world.publish_n(4)
    await world.route("prod", 1)
    experiment = await world.rollouts.CreateExperiment(ro.CreateExperimentRequest(
        parent=world.endpoint_name("prod"), experiment=ro.Experiment(variants=[
            pb.TrafficTarget(version=world.version(1), percent=50),
            pb.TrafficTarget(version=world.version(2), percent=50)])), metadata=world.me)
    err = await fails(FAILED_PRECONDITION, world.delete_version(2))
    info, _ = error_details(err)
    assert info.reason == "VERSION_IN_USE" and experiment.name in info.metadata["runs"]
    assert experiment.name in (err.details() or "")
    for call in (
        world.registry.DeleteEndpoint(
            pb.DeleteEndpointRequest(name=world.endpoint_name("prod")), metadata=world.me),
        world.registry.DeleteAgent(
            pb.DeleteAgentRequest(name=f"agents/{world.agent}", force=True), metadata=world.me),
    ):
        err = await fails(FAILED_PRECONDITION, call)
        info, _ = error_details(err)
        assert (info.reason, info.metadata["runs"]) == ("ROLLOUT_RUNNING", experiment.name)
    assert await world.versions() == [1, 2, 3, 4]


async def test_a_deleted_versions_bundle_goes_unless_another_version_shares_it(world: World) -> None:
    other = who(new_tenant())
    data = world.bundle(1)
    mine = await world.publish(data)
    theirs = await world.publish(data, metadata=other)  # the same bytes in another tenant
    assert mine.digest == theirs.digest
    await world.publish(world.bundle(2))
    await world.publish(world.bundle(3))  # DEFAULT: 3, rollback 2: version 1 is free

    await world.delete_version(1)
    assert await world.bundle_stored(mine.digest)
    downloaded = [m async for m in world.registry.DownloadVersion(
        pb.DownloadVersionRequest(name=theirs.name), metadata=other)]
    assert b"".join(m.chunk for m in downloaded[1:]) == data

    await world.registry.DeleteAgent(
        pb.DeleteAgentRequest(name=f"agents/{world.agent}", force=True), metadata=other)
    assert not await world.bundle_stored(mine.digest)


async def test_collecting_a_bundle_and_publishing_it_again_at_once_keeps_it(world: World) -> None:
    """The bundle row is the lock: a publish of the same digest either waits for a collection
    and stores the bundle again, or (holding it first) makes the collection keep it."""
    pool = await asyncpg.create_pool(world.platform.settings.database_url, min_size=2, max_size=4)
    store, agent = PgStore(pool), AgentRef(world.agent)
    old, new = new_tenant(), new_tenant()

    async def publish(tenant: str, data: bytes) -> None:
        async with store.tx() as tx:
            await tx.ensure_agent(tenant, agent, "u")
            await tx.insert_version(
                tenant, agent, digest_of(data), data, inspect(data).manifest, "u", VersionState.READY
            )

    async def collect(number: int) -> list[str]:
        async with store.tx() as tx:
            return await tx.collect_bundles(await tx.delete_versions(old, agent, [number]))

    try:
        # Numbers are never given twice: round n publishes version n in the old tenant.
        for n, collect_first in ((1, True), (2, False)):
            data = world.bundle(n)
            await publish(old, data)
            async with store.tx() as first:
                if collect_first:
                    assert await first.collect_bundles(
                        await first.delete_versions(old, agent, [n])) == [digest_of(data)]
                    second = asyncio.create_task(publish(new, data))
                else:
                    await first.ensure_agent(new, agent, "u")
                    await first.insert_version(
                        new, agent, digest_of(data), data, inspect(data).manifest, "u", VersionState.READY)
                    second = asyncio.create_task(collect(n))
                await asyncio.sleep(0.3)
                assert not second.done()  # waits for the bundle's row
            result = await second
            if not collect_first:
                assert result == []  # the new version has it: kept
            assert await store.bundle(digest_of(data)) == data
    finally:
        await pool.close()


async def test_deleting_an_endpoint(world: World) -> None:
    await world.publish_n(2)
    prod = await world.route("prod", 1)
    await fails(grpc.StatusCode.ABORTED, world.registry.DeleteEndpoint(
        pb.DeleteEndpointRequest(name=prod.name, etag='W/"999"'), metadata=world.me))
    err = await fails(FAILED_PRECONDITION, world.registry.DeleteEndpoint(
        pb.DeleteEndpointRequest(name=world.endpoint_name("DEFAULT")), metadata=world.me))
    assert error_details(err)[0].reason == "DEFAULT_ENDPOINT_READ_ONLY"

    watch = world.registry.WatchEndpoints(
        pb.WatchEndpointsRequest(parent=f"agents/{world.agent}"), metadata=world.me)
    assert (await watch.read()).snapshot
    await world.registry.DeleteEndpoint(
        pb.DeleteEndpointRequest(name=prod.name, etag=prod.etag), metadata=world.me)
    removed = await watch.read()
    assert [(e.name, e.tenant) for e in removed.removed_endpoints] == [(prod.name, prod.tenant)]
    watch.cancel()

    await fails(NOT_FOUND, world.registry.GetEndpoint(
        pb.GetEndpointRequest(name=prod.name), metadata=world.me))
    listed = await world.registry.ListEndpoints(
        pb.ListEndpointsRequest(parent=f"agents/{world.agent}"), metadata=world.me)
    assert [e.name for e in listed.endpoints] == [world.endpoint_name("DEFAULT")]
    # Nothing routes to version 1 any more, and DEFAULT keeps only 1 for rollback.
    await world.route("prod", 2)
    await world.registry.DeleteEndpoint(pb.DeleteEndpointRequest(name=prod.name), metadata=world.me)
    await world.publish(world.bundle(3))
    await world.delete_version(1)


async def test_deleting_an_agent(world: World) -> None:
    versions = await world.publish_n(2)
    await world.route("prod", 1)
    agent = f"agents/{world.agent}"
    err = await fails(FAILED_PRECONDITION, world.registry.DeleteAgent(
        pb.DeleteAgentRequest(name=agent), metadata=world.me))
    info, _ = error_details(err)
    assert (info.reason, info.metadata["versions"]) == ("AGENT_HAS_VERSIONS", "2")

    session = await world.pin_session(versions[0])
    err = await fails(FAILED_PRECONDITION, world.registry.DeleteAgent(
        pb.DeleteAgentRequest(name=agent, force=True), metadata=world.me))
    assert error_details(err)[0].metadata["sessions"] == "1"
    await world.sessions.StopSession(ses.StopSessionRequest(name=session.name), metadata=world.me)

    await world.registry.DeleteAgent(pb.DeleteAgentRequest(name=agent, force=True), metadata=world.me)
    await fails(NOT_FOUND, world.registry.GetAgent(pb.GetAgentRequest(name=agent), metadata=world.me))
    await fails(NOT_FOUND, world.registry.GetVersion(
        pb.GetVersionRequest(name=versions[0].name), metadata=world.me))
    agents = await world.registry.ListAgents(pb.ListAgentsRequest(), metadata=world.me)
    assert agent not in [a.name for a in agents.agents]
    endpoints = await world.registry.ListEndpoints(pb.ListEndpointsRequest(), metadata=world.me)
    assert not endpoints.endpoints

    # Publishing again makes a new agent, whose numbers do not start over: a cached version 1
    # elsewhere must never name other bytes.
    again = await world.publish(world.bundle(3))
    assert again.number == 3


async def test_another_tenant_cannot_delete(world: World) -> None:
    await world.publish_n(3)
    await world.route("prod", 1)
    other = who(new_tenant())
    agent = f"agents/{world.agent}"
    await fails(NOT_FOUND, world.registry.DeleteAgent(
        pb.DeleteAgentRequest(name=agent, force=True), metadata=other))
    await fails(NOT_FOUND, world.delete_version(1, metadata=other))
    await fails(NOT_FOUND, world.registry.DeleteEndpoint(
        pb.DeleteEndpointRequest(name=world.endpoint_name("prod")), metadata=other))
    assert await world.versions() == [1, 2, 3]
    await world.registry.GetEndpoint(
        pb.GetEndpointRequest(name=world.endpoint_name("prod")), metadata=world.me)


async def test_retention_deletes_only_unused_versions_nothing_keeps(world: World) -> None:
    versions = await world.publish_n(5)  # DEFAULT serves 5 and keeps 4 for rollback
    await world.route("prod", 1)
    await world.pin_session(versions[1])
    settings = world.platform.settings
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    sessions = SessionsClient(settings.for_service("registry"))
    clock = FakeClock(datetime.now(UTC))
    lifecycle = Lifecycle(PgStore(pool), sessions, retention_days=45, clock=clock)
    try:
        clock.advance(timedelta(days=44).total_seconds())
        assert await lifecycle.apply_retention() == 0
        lifecycle.retention_days = 0  # off
        clock.advance(timedelta(days=400).total_seconds())
        assert await lifecycle.apply_retention() == 0
        assert await world.versions() == [1, 2, 3, 4, 5]

        lifecycle.retention_days = 45
        await lifecycle.apply_retention()
        # 1: prod routes to it; 2: a live session; 4: DEFAULT's rollback; 5: the newest.
        assert await world.versions() == [1, 2, 4, 5]
    finally:
        await sessions.close()
        await pool.close()
    audit = await world.registry.ListAuditEvents(
        pb.ListAuditEventsRequest(resource_prefix=world.version(3)), metadata=world.me)
    event = audit.events[0]
    registry = acting_for(principal_of(world.me).tenant).describe()
    assert (event.method, event.user) == ("DeleteVersion", registry)
    assert event.details["retention_days"] == 45
