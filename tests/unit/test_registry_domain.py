"""The registry's domain (versions, endpoints, the watch, listings, tools) against in-memory fakes:
no sockets, no database."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from corral.names import AgentRef, ToolRef, VersionRef
from services.common.endpoints import TrafficShare
from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.common.identity import Caller
from services.registry.model import EndpointChange, Paging, RegistryStore, ToolStore
from services.registry.rollout_model import RolloutRequest, RolloutState, SetWeight, TrafficTarget
from services.registry.secrets import SecretBox
from services.registry.tool_model import ToolChange, ToolDraft
from services.registry.tool_rules import tool_change, tool_spec
from services.registry.tools import Tools
from tests.bundles import packed_agent
from tests.fakes.common import FakeClock
from tests.fakes.registry import (
    REGISTRY_TENANT,
    FakeRegistryStore,
    RegistryWorld,
    registry_world,
)

pytestmark = pytest.mark.timeout(20)

ALICE = Caller(REGISTRY_TENANT, "alice")
CODE = "from corral.sdk import App\napp = App()\n"
AGENT = AgentRef("support")
PROD = AGENT.endpoint("prod")


def bundle(tmp: Path, agent: str = AGENT.agent, prompt: str = "You help.\n") -> bytes:
    return packed_agent(tmp, agent, CODE, prompt=prompt)


def traffic(*split: tuple[int, float]) -> EndpointChange:
    return EndpointChange(tuple(TrafficTarget(AGENT.version(v), p) for v, p in split), None)


@pytest.fixture
def world() -> RegistryWorld:
    return registry_world()


async def published(world: RegistryWorld, tmp: Path, count: int) -> None:
    for i in range(count):
        await world.registry.publish(ALICE, None, bundle(tmp, prompt=f"v{i}\n"), "", "")


def test_the_fakes_are_the_seams() -> None:
    store = FakeRegistryStore(FakeClock())
    registry_store: RegistryStore = store
    tool_store: ToolStore = store
    assert registry_store is store and tool_store is store


# -- versions ----------------------------------------------------------------------------------


async def test_publishing_makes_versions_and_default_follows_the_newest(
    world: RegistryWorld, tmp_path: Path
) -> None:
    first = bundle(tmp_path)
    v1, created = await world.registry.publish(ALICE, AGENT, first, "", "req-1")
    assert (v1.number, created) == (1, True)
    again, created = await world.registry.publish(ALICE, None, first, "", "req-2")
    assert (again, created) == (v1, False)
    v2, _ = await world.registry.publish(ALICE, None, bundle(tmp_path, prompt="v2\n"), "", "")
    assert v2.number == 2
    default = await world.registry.get_endpoint(ALICE, AGENT.endpoint("DEFAULT"))
    assert default.traffic == (TrafficShare(2, 10_000),) and default.follow_latest
    assert (await world.registry.get_agent(ALICE, AGENT)).latest_version == 2
    by_digest = await world.registry.get_version(ALICE, VersionRef(AGENT.agent, digest=v1.digest))
    assert by_digest == v1
    assert [e.method for e in world.store.events] == ["PublishVersion", "PublishVersion"]


async def test_a_bundle_for_another_agent_than_the_parent_is_refused(
    world: RegistryWorld, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgument) as err:
        await world.registry.publish(ALICE, AgentRef("other"), bundle(tmp_path), "", "")
    assert [v.field for v in err.value.violations] == ["header.parent"]
    assert not world.store.agents and not world.store.events
    with pytest.raises(NotFound):
        await world.registry.get_version(ALICE, AGENT.version(1))


# -- endpoints ---------------------------------------------------------------------------------


async def test_endpoint_changes_are_checked_and_guarded_by_etags(
    world: RegistryWorld, tmp_path: Path
) -> None:
    await published(world, tmp_path, 2)
    set_endpoint = world.registry.set_endpoint
    with pytest.raises(NotFound):
        await set_endpoint(ALICE, PROD, traffic((1, 100)))
    prod = await set_endpoint(ALICE, PROD, traffic((1, 90), (2, 10)), allow_missing=True)
    assert prod.traffic == (TrafficShare(1, 9000), TrafficShare(2, 1000)) and prod.revision == 1
    with pytest.raises(AlreadyExists):
        await set_endpoint(ALICE, PROD, traffic((1, 100)), must_create=True, allow_missing=True)
    with pytest.raises(Aborted) as aborted:
        await set_endpoint(ALICE, PROD, traffic((1, 100)), etag='W/"7"')
    assert aborted.value.reason == "ETAG_MISMATCH"
    with pytest.raises(FailedPrecondition) as missing:
        await set_endpoint(ALICE, PROD, traffic((1, 50), (7, 50)))
    assert missing.value.reason == "VERSION_NOT_FOUND" and "no version 7" in missing.value.message
    with pytest.raises(FailedPrecondition) as default:
        await set_endpoint(ALICE, AGENT.endpoint("DEFAULT"), traffic((1, 100)))
    assert default.value.reason == "DEFAULT_ENDPOINT_READ_ONLY"
    foreign = EndpointChange((TrafficTarget(VersionRef("other", 1), 100),), None)
    with pytest.raises(InvalidArgument) as err:
        await set_endpoint(ALICE, PROD, foreign)
    assert [v.field for v in err.value.violations] == ["endpoint.traffic[0].version"]
    assert await world.registry.get_endpoint(ALICE, PROD) == prod

    described = await set_endpoint(ALICE, PROD, EndpointChange(None, "canary"), etag=prod.etag)
    assert (described.traffic, described.description) == (prod.traffic, "canary")
    await set_endpoint(ALICE, PROD, traffic((1, 100)))
    moved = await set_endpoint(ALICE, PROD, traffic((2, 100)))
    assert moved.description == "canary" and moved.rollback_version == 1
    with pytest.raises(InvalidArgument) as needs_traffic:
        await set_endpoint(ALICE, AGENT.endpoint("new"), EndpointChange(None, "x"), allow_missing=True)
    assert [v.field for v in needs_traffic.value.violations] == ["update_mask"]


async def test_a_manual_traffic_change_aborts_a_running_rollout_but_a_description_does_not(
    world: RegistryWorld, tmp_path: Path
) -> None:
    await published(world, tmp_path, 2)
    await world.registry.set_endpoint(ALICE, PROD, traffic((1, 100)), allow_missing=True)
    rollout = await world.rollouts.create(
        ALICE, PROD, RolloutRequest(AGENT.version(2), steps=(SetWeight(50), SetWeight(100))))
    await world.registry.set_endpoint(ALICE, PROD, EndpointChange(None, "still one"))
    assert (await world.rollouts.get(ALICE, rollout.ref)).state is RolloutState.PROGRESSING
    await world.registry.set_endpoint(ALICE, PROD, traffic((1, 100)))
    aborted = await world.rollouts.get(ALICE, rollout.ref)
    assert aborted.state is RolloutState.ABORTED and "manually by alice" in aborted.state_reason
    assert world.announced.events == ["STARTED", "ABORTED"]


async def test_the_watch_sends_a_snapshot_then_each_committed_change(
    world: RegistryWorld, tmp_path: Path
) -> None:
    await published(world, tmp_path, 1)
    await world.registry.start_watching()
    watch = world.registry.watch(ALICE, AGENT)
    snapshot = await anext(watch)
    assert snapshot.snapshot and [e.id for e in snapshot.endpoints] == ["DEFAULT"]
    # Another agent's change is not this watcher's.
    await world.registry.publish(ALICE, None, bundle(tmp_path, agent="other"), "", "")
    await published(world, tmp_path, 2)
    changed = await asyncio.wait_for(anext(watch), 1)
    assert not changed.snapshot
    assert [(e.id, e.traffic[0].version) for e in changed.endpoints] == [("DEFAULT", 2)]
    await world.registry.stop_watching()
    with pytest.raises(StopAsyncIteration):
        await anext(watch)


# -- listings ----------------------------------------------------------------------------------


async def test_listings_page_by_keyset_tokens_bound_to_query_and_tenant(
    world: RegistryWorld, tmp_path: Path
) -> None:
    for name in ("e", "a", "d", "c", "b"):
        await world.registry.create_agent(ALICE, AgentRef(name))
    first = await world.registry.list_agents(Paging(ALICE, 2))
    assert [a.id for a in first.items] == ["a", "b"] and first.next_page_token
    # A new agent before the position neither repeats nor shifts what follows.
    await world.registry.create_agent(ALICE, AgentRef("aa"))
    second = await world.registry.list_agents(Paging(ALICE, 2, first.next_page_token))
    assert [a.id for a in second.items] == ["c", "d"]
    last = await world.registry.list_agents(Paging(ALICE, 2, second.next_page_token))
    assert [a.id for a in last.items] == ["e"] and not last.next_page_token

    for who in (Caller("globex", "bob"),):
        with pytest.raises(InvalidArgument) as err:
            await world.registry.list_agents(Paging(who, 2, first.next_page_token))
        assert [v.field for v in err.value.violations] == ["page_token"]
    with pytest.raises(InvalidArgument):
        await world.registry.list_audit("agents/", Paging(ALICE, 2, first.next_page_token))

    events = await world.registry.list_audit("agents/", Paging(ALICE, 4))
    assert [e.resource for e in events.items] == ["agents/aa", "agents/b", "agents/c", "agents/d"]
    with pytest.raises(NotFound):
        await world.registry.list_versions(AgentRef("nobody"), Paging(ALICE))


# -- tools -------------------------------------------------------------------------------------

SEARCH = ToolRef("search")
SECRET = "sk-0123456789"


def tools(world: RegistryWorld, box: SecretBox | None) -> Tools:
    return Tools(world.store, box)


async def test_a_tool_secret_is_sealed_at_rest_and_opened_only_to_resolve(world: RegistryWorld) -> None:
    domain = tools(world, SecretBox(os.urandom(32)))
    spec = tool_spec(ToolDraft("http", "https://search.example/api?key=1", None, "web search"))
    created = await domain.create(ALICE, SEARCH, spec, SECRET, request_id="r1")
    stored = world.store.tools[(REGISTRY_TENANT, "search")]
    assert created.has_secret and stored.secret_ciphertext and SECRET.encode() not in stored.secret_ciphertext
    assert await domain.create(ALICE, SEARCH, spec, SECRET, request_id="r1") == created
    with pytest.raises(AlreadyExists):
        await domain.create(ALICE, SEARCH, spec, SECRET)
    record, secret = await domain.resolve(REGISTRY_TENANT, SEARCH)
    assert (record, secret) == (created, SECRET)
    with pytest.raises(NotFound):
        await domain.resolve("globex", SEARCH)
    audited = world.store.events[-1]
    assert audited.method == "CreateTool" and audited.details["address"] == "https://search.example/api"
    assert SECRET not in str(audited.details)

    with pytest.raises(FailedPrecondition) as err:
        await tools(world, None).resolve(REGISTRY_TENANT, SEARCH)
    assert err.value.reason == "SECRETS_KEY_MISSING"
    with pytest.raises(FailedPrecondition) as err:
        await tools(world, SecretBox(os.urandom(32))).resolve(REGISTRY_TENANT, SEARCH)
    assert err.value.reason == "SECRET_UNREADABLE" and SECRET not in err.value.message


async def test_a_tool_update_changes_the_masked_fields_under_its_etag(world: RegistryWorld) -> None:
    domain = tools(world, None)
    spec = tool_spec(ToolDraft("http", "https://search.example", 2_500_000_000, ""))
    assert spec.timeout_ms == 2500
    created = await domain.create(ALICE, SEARCH, spec, "")
    change = tool_change(ToolDraft(kind="grpc", address="search:443"), ["kind", "address"])
    assert change == ToolChange(kind="grpc", address="search:443")
    updated = await domain.update(ALICE, SEARCH, change, created.etag)
    assert (updated.spec.kind, updated.spec.address, updated.spec.timeout_ms) == ("grpc", "search:443", 2500)
    assert world.store.events[-1].details["changed"] == ["address", "kind"]
    with pytest.raises(Aborted):
        await domain.update(ALICE, SEARCH, ToolChange(description="x"), created.etag)
    with pytest.raises(InvalidArgument) as err:
        await domain.update(ALICE, SEARCH, ToolChange(kind="http"))
    assert [v.field for v in err.value.violations] == ["tool.address"]
    listed = await domain.list_tools(Paging(ALICE))
    assert listed.items == [updated]
    await domain.delete(ALICE, SEARCH, updated.etag)
    with pytest.raises(NotFound):
        await domain.get(ALICE, SEARCH)
