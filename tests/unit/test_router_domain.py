"""The router's domain against fake sessions, registry, executor and endpoints: no sockets."""

from __future__ import annotations

import dataclasses

import pytest

from corral.names import AgentRef, EndpointRef, ResourceNameError, SessionRef, VersionRef
from corral.router.v1 import router_pb2 as pb
from services.common.auth.principal import Role
from services.common.endpoints import EndpointMirror, EndpointTraffic, TrafficShare
from services.common.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from services.common.identity import Caller
from services.common.tenancy import SessionOwner
from services.router.model import (
    Chunk,
    Completed,
    Started,
    Target,
    VersionInfo,
)
from services.router.placing import Placement
from services.router.router import Router
from services.router.routing import bucket, choose
from services.router.servicer import target_of
from tests.fakes.common import SequentialIds
from tests.fakes.router import (
    FakeEndpoints,
    FakeExecutor,
    FakeFleet,
    FakeRegistry,
    FakeSessions,
    member,
)

AGENT = AgentRef("demo")
V1, V2 = AGENT.version(1), AGENT.version(2)
PROD = AGENT.endpoint("prod")
INVOKER = frozenset({Role.INVOKER})
ALICE = Caller("acme", "alice", INVOKER)
BOB = Caller("acme", "bob", INVOKER)
# Another tenant's user of the same name, with every role there.
ALICE_OF_BETA = Caller("beta", "alice", frozenset({Role.ADMIN}))
OLGA_OPERATOR = Caller("acme", "olga", frozenset({Role.OPERATOR}))
ALICES = SessionOwner("acme", "alice")
MAX_PAYLOAD = 64


def digest(version: VersionRef) -> str:
    return f"sha256:{version.number:064x}"


def split(revision: int, *shares: tuple[int, int]) -> EndpointTraffic:
    """prod's traffic at `revision`: (version, basis points) pairs, half and half by default."""
    pairs = shares or ((1, 5000), (2, 5000))
    return EndpointTraffic(PROD, "salt", revision, tuple(TrafficShare(v, bp) for v, bp in pairs),
                           tenant=ALICE.tenant)


@dataclasses.dataclass
class World:
    router: Router
    sessions: FakeSessions
    registry: FakeRegistry
    executor: FakeExecutor
    mirror: EndpointMirror
    fleet: FakeFleet

    def fresh_router_in(self, world: World, router: Router | None = None) -> World:
        """This world seen through `router` (another replica)."""
        return dataclasses.replace(world, router=router or self.fresh_router())

    def fresh_router(self) -> Router:
        """Another router (a replica, or this one restarted) on the same services: no pins."""
        return Router(
            self.sessions, self.registry, self.executor, self.mirror, MAX_PAYLOAD,
            Placement(self.fleet.view(), self.sessions),
        )


@pytest.fixture
def world() -> World:
    sessions, executor, fleet = FakeSessions(), FakeExecutor(), FakeFleet("exec-a", "exec-b")
    registry = FakeRegistry(
        VersionInfo(V1, digest(V1), idle_timeout_s=60, max_lifetime_s=120),
        VersionInfo(V2, digest(V2)),
    )
    mirror = EndpointMirror(FakeEndpoints(split(1)))
    router = Router(
        sessions, registry, executor, mirror, MAX_PAYLOAD, Placement(fleet.view(), sessions),
        SequentialIds(),
    )
    return World(router, sessions, registry, executor, mirror, fleet)


async def test_another_tenants_endpoint_of_the_same_name_is_not_this_ones(world: World) -> None:
    # Tenant "other" has agents/demo/endpoints/prod too, all on v2; acme's is still half and half.
    world.mirror.apply(EndpointTraffic(PROD, "salt", 9, (TrafficShare(2, 10_000),), tenant="other"))
    chosen = {(await world.router.resolve(ALICE, at(f"s{i}"))).pin.version for i in range(40)}
    assert chosen == {V1, V2}
    assert world.mirror.cached(ALICE.tenant, PROD) == split(1)
    other = world.mirror.cached("other", PROD)
    assert other is not None and other.revision == 9


def at(
    session: str, endpoint: EndpointRef | None = PROD, version: VersionRef | None = None
) -> Target:
    """A target naming session `session`, through prod unless told otherwise."""
    return Target(AGENT, endpoint, version, SessionRef(session))


async def test_a_new_session_is_pinned_by_the_endpoints_split(world: World) -> None:
    chosen: dict[VersionRef, int] = {}
    for i in range(40):
        resolved = await world.router.resolve(ALICE, at(f"s{i}"))
        assert resolved.new_session and resolved.pin.endpoint == PROD
        chosen_bucket = bucket("salt", f"s{i}")
        assert resolved.pin.version == AGENT.version(choose(split(1).shares, chosen_bucket))
        assert resolved.pin.digest == digest(resolved.pin.version)
        chosen[resolved.pin.version] = chosen.get(resolved.pin.version, 0) + 1
        pin = world.sessions.pins["acme", resolved.pin.session]
        assert (pin.version, pin.endpoint, pin.owner) == (resolved.pin.version, PROD, ALICES)
    assert set(chosen) == {V1, V2}
    # The session takes its version's timeouts.
    on_v1 = next(s for (_, s), p in world.sessions.pins.items() if p.version == V1)
    created_on = world.sessions.created_on[on_v1]
    assert (created_on.idle_timeout_s, created_on.max_lifetime_s) == (60, 120)


async def test_without_an_id_or_endpoint_a_new_session_on_the_default_endpoint(
    world: World,
) -> None:
    default = AGENT.endpoint("DEFAULT")
    world.mirror.apply(EndpointTraffic(default, "s", 1, (TrafficShare(2, 10_000),), tenant=ALICE.tenant))
    resolved = await world.router.resolve(ALICE, Target(AGENT))
    assert resolved.pin.session == SessionRef("id0001") and resolved.new_session
    assert (resolved.pin.version, resolved.pin.endpoint) == (V2, default)


async def test_a_named_version_pins_directly_whatever_the_endpoint(world: World) -> None:
    nowhere = AGENT.endpoint("nowhere")
    resolved = await world.router.resolve(ALICE, at("direct", nowhere, version=V1))
    assert (resolved.pin.version, resolved.pin.endpoint, resolved.new_session) == (V1, None, True)
    with pytest.raises(NotFound, match="agents/demo/versions/9"):
        await world.router.resolve(ALICE, at("nine", version=AGENT.version(9)))
    with pytest.raises(InvalidArgument) as info:
        await world.router.resolve(ALICE, at("x", version=VersionRef("other", 1)))
    assert info.value.violations[0].field == "version"
    assert ("acme", SessionRef("nine")) not in world.sessions.pins


async def test_an_existing_session_follows_its_pin(world: World) -> None:
    first = await world.router.resolve(ALICE, at("kept"))
    # The split changes: the session keeps its version, from the cached pin (sessions not asked).
    world.mirror.apply(split(2, (first.pin.version.number, 10_000)))
    again = await world.router.resolve(ALICE, at("kept"))
    assert (again.pin.version, again.new_session) == (first.pin.version, False)
    assert world.sessions.gets == 0
    # A router that has not seen it, asked through an endpoint that does not exist: the pin
    # decides.
    replica = world.fresh_router()
    followed = await replica.resolve(ALICE, at("kept", AGENT.endpoint("nowhere")))
    assert (followed.pin.version, followed.pin.endpoint) == (first.pin.version, PROD)
    assert not followed.new_session
    # A session of another agent is not taken over.
    with pytest.raises(FailedPrecondition) as info:
        await replica.resolve(ALICE, dataclasses.replace(at("kept"), agent=AgentRef("other")))
    assert info.value.reason == "SESSION_AGENT_MISMATCH"


async def test_another_users_session_is_refused_unless_an_operator_continues_it(
    world: World,
) -> None:
    await world.router.resolve(ALICE, at("mine"))
    for router in (world.router, world.fresh_router()):  # with the pin cached, and without
        with pytest.raises(PermissionDenied, match="may not change sessions/mine"):
            await router.resolve(BOB, at("mine"))
    with pytest.raises(PermissionDenied):
        await world.router.stop_session(BOB, SessionRef("mine"))
    assert world.sessions.pins["acme", SessionRef("mine")].ended is None
    continued = await world.router.resolve(OLGA_OPERATOR, at("mine"))
    assert (continued.new_session, continued.pin.owner) == (False, ALICES)


async def test_another_tenant_naming_the_same_session_gets_one_of_its_own(world: World) -> None:
    mine = await world.router.resolve(ALICE, at("shared"))
    # Beta has an agent of the same name, with its own prod endpoint.
    world.mirror.apply(EndpointTraffic(PROD, "salt", 1, (TrafficShare(1, 10_000),), tenant="beta"))
    # With alice's pin cached in this router, and in one that never saw it.
    for router in (world.router, world.fresh_router()):
        theirs = await router.resolve(ALICE_OF_BETA, at("shared"))
        assert theirs.pin.owner == SessionOwner("beta", "alice")
        assert theirs.new_session is (router is world.router)
    assert world.sessions.pins["acme", SessionRef("shared")] == mine.pin
    again = await world.router.resolve(ALICE, at("shared"))
    assert (again.pin, again.new_session) == (mine.pin, False)


async def test_a_stopped_session_is_refused(world: World) -> None:
    await world.router.resolve(ALICE, at("ending"))
    await world.router.stop_session(ALICE, SessionRef("ending"))
    assert world.executor.stopped == [SessionRef("ending")]
    for router in (world.router, world.fresh_router()):
        with pytest.raises(FailedPrecondition, match="sessions/ending is stopped") as info:
            await router.resolve(ALICE, at("ending"))
        assert info.value.reason == "SESSION_ENDED"
    with pytest.raises(NotFound):
        await world.router.stop_session(ALICE, SessionRef("never"))


async def test_a_pin_whose_version_the_endpoint_left_is_read_again(world: World) -> None:
    first = await world.router.resolve(ALICE, at("moved"))
    other = V2 if first.pin.version == V1 else V1
    # A rollback takes the endpoint off the session's version and migrates its sessions.
    world.mirror.apply(split(2, (other.number, 10_000)))
    key = ("acme", SessionRef("moved"))
    world.sessions.pins[key] = dataclasses.replace(
        world.sessions.pins[key], version=other, digest=digest(other)
    )
    moved = await world.router.resolve(ALICE, at("moved"))
    assert (moved.pin.version, moved.pin.digest, world.sessions.gets) == (other, digest(other), 1)
    # The pin read again is cached: the next turn does not ask.
    await world.router.resolve(ALICE, at("moved"))
    assert world.sessions.gets == 1


async def test_payload_limits(world: World) -> None:
    for payload in (b"", b"x" * (MAX_PAYLOAD + 1)):
        with pytest.raises(InvalidArgument) as info:
            await anext(world.router.invoke(ALICE, at("p"), payload, "", ()))
        assert info.value.violations[0].field == "payload"
    assert not world.sessions.pins, "a refused payload creates no session"
    events = [e async for _, e in world.router.invoke(ALICE, at("p"), b"x" * MAX_PAYLOAD, "", ())]
    assert events[-1] == Completed(duration_ms=1, turn=1)


async def test_invoke_streams_the_execution_and_closing_it_ends_the_execution(
    world: World,
) -> None:
    stream = world.router.invoke(ALICE, at("talk"), b'{"hi": 1}', "", (("traceparent", "t"),))
    events = [event async for _, event in stream]
    assert isinstance(events[0], Started)
    assert b"".join(e.data for e in events if isinstance(e, Chunk)) == b'{"hi": 1}'
    sent = world.executor.invocations[0]
    assert sent.content_type == "application/json"
    assert sent.resolved.pin.session == SessionRef("talk")
    # The caller goes away after the first event: the execution is closed, not left running.
    stream = world.router.invoke(ALICE, at("talk"), b"{}", "text/plain", ())
    await anext(stream)
    await stream.aclose()
    assert world.executor.closed[-1] == world.executor.invocations[-1].invocation_id
    assert world.executor.turns[SessionRef("talk")] == 1


async def test_a_version_that_did_not_start_at_publish_takes_no_new_session(world: World) -> None:
    v3 = AGENT.version(3)
    world.registry.versions[v3] = VersionInfo(v3, digest(v3), ready=False)
    with pytest.raises(FailedPrecondition) as refused:
        await world.router.resolve(ALICE, at("on-v3", endpoint=None, version=v3))
    assert refused.value.reason == "VERSION_NOT_READY" and v3.name in refused.value.message
    assert not world.sessions.pins and not world.executor.invocations


async def test_a_new_session_whose_version_cannot_start_is_deleted(world: World) -> None:
    world.executor.fails_with = Internal("the agent failed to load", reason="AGENT_LOAD_ERROR")
    with pytest.raises(Internal):
        await anext(world.router.invoke(ALICE, at("broken"), b"{}", "", ()))
    assert not world.sessions.pins, "the session made for the turn is gone"
    # A session that existed before the failing turn stays: it has turns of its own.
    world.executor.fails_with = None
    [_ async for _ in world.router.invoke(ALICE, at("kept"), b"{}", "", ())]
    world.executor.fails_with = Internal("the agent failed to load", reason="AGENT_LOAD_ERROR")
    with pytest.raises(Internal):
        await anext(world.router.invoke(ALICE, at("kept"), b"{}", "", ()))
    assert list(world.sessions.pins) == [("acme", SessionRef("kept"))]
    # Nor is a new session deleted for the agent's own failure on its first turn.
    world.executor.fails_with = Internal("the agent raised", reason="AGENT_ERROR")
    with pytest.raises(Internal):
        await anext(world.router.invoke(ALICE, at("raised"), b"{}", "", ()))
    assert ("acme", SessionRef("raised")) in world.sessions.pins


async def test_content_type_and_attributes_are_bounded(world: World) -> None:
    with pytest.raises(InvalidArgument) as info:
        await anext(world.router.invoke(ALICE, at("ct"), b"{}", "x" * 256, ()))
    assert info.value.violations[0].field == "content_type"
    assert not world.sessions.pins
    bad = [
        {f"k{i}": "v" for i in range(65)},
        {"k" * 129: "v"},
        {"": "v"},
        {"k": "v" * 1025},
    ]
    for attributes in bad:
        with pytest.raises(InvalidArgument):
            target_of(pb.InvokeRequest(agent="agents/demo", attributes=attributes))
    fine = {f"k{i}": "v" * 1024 for i in range(64)}
    assert target_of(pb.InvokeRequest(agent="agents/demo", attributes=fine)) == Target(AGENT)


def test_the_servicer_parses_what_an_invocation_names() -> None:
    request = pb.InvokeRequest(agent="agents/demo", endpoint="prod", version="2", session_id="a:b")
    assert target_of(request) == Target(AGENT, PROD, V2, SessionRef("a:b"))
    assert target_of(pb.InvokeRequest(agent="agents/demo")) == Target(AGENT)
    full = pb.ConverseStart(agent="agents/demo", version="agents/other/versions/3")
    assert target_of(full).version == VersionRef("other", 3)  # refused later, by the router
    invalid = {
        "agent": [{"agent": "demo"}, {"agent": "agents/Bad_Name"}],
        "version": [{"version": "v2"}, {"version": "0"}],
        "endpoint": [{"endpoint": "no such"}],
        "session_id": [{"session_id": "has space"}],
    }
    for field, changes in invalid.items():
        for change in changes:
            bad = pb.InvokeRequest(**{"agent": "agents/demo", **change})  # type: ignore[arg-type]
            with pytest.raises(ResourceNameError) as info:
                target_of(bad)
            assert info.value.field == field, change


async def turn(world: World, session: str) -> str:
    """Runs one turn of `session`; the executor it went to."""
    async for _ in world.router.invoke(ALICE, at(session), b"{}", "", ()):
        pass
    return world.executor.sent_to[-1]


async def test_a_session_is_placed_once_and_every_router_sends_its_turns_there(world: World) -> None:
    first = await turn(world, "placed")
    assert world.sessions.pins["acme", SessionRef("placed")].executor == first
    assert await turn(world, "placed") == first
    assert await turn(world.fresh_router_in(world), "placed") == first


async def test_a_session_moves_when_its_executor_leaves_or_is_drained(world: World) -> None:
    first = await turn(world, "moving")
    other = ({"exec-a", "exec-b"} - {first}).pop()
    world.fleet.members = [m for m in world.fleet.members if m.name != first]
    await world.router.placement.fleet.refresh()
    assert await turn(world, "moving") == other
    assert world.sessions.pins["acme", SessionRef("moving")].executor == other
    # Back and undrained, it takes new sessions again; drained, its sessions move at their turn.
    world.fleet.members = [member(first), member(other, draining=True)]
    await world.router.placement.fleet.refresh()
    assert await turn(world, "moving") == first
    assert world.sessions.pins["acme", SessionRef("moving")].executor == first


async def test_two_routers_moving_one_session_agree_on_one_executor(world: World) -> None:
    await turn(world, "raced")
    other_router = world.fresh_router()
    await turn(world.fresh_router_in(world, other_router), "raced")
    # Both routers hold the pin; the session's executor leaves; one router moves it.
    gone = world.sessions.pins["acme", SessionRef("raced")].executor
    world.fleet.members = [m for m in world.fleet.members if m.name != gone] + [member("exec-c")]
    for router in (world.router, other_router):
        await router.placement.fleet.refresh()
    moved_to = await turn(world, "raced")
    # The other router's pin still names the executor that left: its CAS fails, it follows.
    assert await turn(world.fresh_router_in(world, other_router), "raced") == moved_to


async def test_with_no_executor_a_turn_is_unavailable_and_says_so(world: World) -> None:
    world.fleet.members = []
    with pytest.raises(Unavailable) as refused:
        await turn(world, "nowhere")
    assert refused.value.reason == "NO_EXECUTORS" and refused.value.retry_delay_s
    # Nothing was created for it.
    assert ("acme", SessionRef("nowhere")) not in world.sessions.pins


async def test_a_session_an_executor_has_no_room_for_goes_to_another_else_is_told_to_back_off(
    world: World,
) -> None:
    first = await turn(world, "crowded")
    other = ({"exec-a", "exec-b"} - {first}).pop()
    world.executor.full.add(first)
    assert await turn(world, "crowded") == other
    assert world.sessions.pins["acme", SessionRef("crowded")].executor == other
    world.executor.full.add(other)
    with pytest.raises(ResourceExhausted) as refused:
        await turn(world, "crowded")
    assert refused.value.reason == "EXECUTOR_AT_CAPACITY" and refused.value.retry_delay_s
    # With no other executor to go to, the refusal is the answer, not "no executors".
    world.executor.full.discard(first)
    world.fleet.members = [member(other)]
    await world.router.placement.fleet.refresh()
    with pytest.raises(ResourceExhausted) as alone:
        await turn(world, "crowded")
    assert alone.value.reason == "EXECUTOR_AT_CAPACITY"


async def test_an_executor_that_cannot_be_reached_is_passed_over_but_one_that_died_mid_turn_fails_the_turn(
    world: World,
) -> None:
    first = await turn(world, "fragile")
    other = ({"exec-a", "exec-b"} - {first}).pop()
    # Killed, still listed: the turn had not started, so it goes to the other executor.
    world.executor.unreachable.add(first)
    assert await turn(world, "fragile") == other
    assert world.sessions.pins["acme", SessionRef("fragile")].executor == other
    # Dying after the turn started: the turn may have run, so it is not sent again.
    world.executor.dies_mid_turn.add(other)
    sent = len(world.executor.sent_to)
    with pytest.raises(Unavailable) as failed:
        await turn(world, "fragile")
    assert failed.value.reason == "EXECUTOR_UNAVAILABLE"
    assert world.executor.sent_to[sent:] == [other]
