"""The sessions domain with in-memory storage and a hand-driven clock: no sockets, no databases."""

from __future__ import annotations

import dataclasses

import pytest
from google.protobuf import duration_pb2

from corral.names import AgentRef, EndpointRef, ResourceNameError, SessionRef, VersionRef
from corral.sessions.v1 import sessions_pb2 as pb
from services.common.auth.principal import Principal, Role
from services.common.errors import (
    Aborted,
    AlreadyExists,
    CorralError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.common.identity import Caller
from services.sessions.messages import new_session, retirement, session_filter
from services.sessions.model import (
    NewSession,
    PinnedVersion,
    SessionFilter,
    SessionKey,
    SessionStatus,
    Turn,
)
from services.sessions.rules import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_LIFETIME_S,
    MAX_STATE_BYTES,
    check_pin,
    check_state_size,
    lease_ttl,
)
from services.sessions.sessions import Sessions
from tests.fakes.common import FakeClock, SequentialIds
from tests.fakes.sessions import MemoryLeases, MemoryStore

DIGEST = "sha256:" + "ab" * 32
SPEC = NewSession(agent=AgentRef("demo"), pin=PinnedVersion(VersionRef("demo", 1), DIGEST))
INVOKER = frozenset({Role.INVOKER})
ALICE = Caller("acme", "alice", INVOKER)
BOB = Caller("acme", "bob", INVOKER)
# Another tenant, with a user of the same name and every role there.
MALLORY = Caller("evil", "alice", frozenset({Role.ADMIN}))
CAROL_OPERATOR = Caller("acme", "carol", frozenset({Role.OPERATOR}))
VERA_VIEWER = Caller("acme", "vera", frozenset({Role.VIEWER}))
NOBODY = Caller("acme", "nobody")


def ref(session_id: str) -> SessionRef:
    return SessionRef(session_id)


def key(session_id: str, tenant: str = "acme") -> SessionKey:
    return SessionKey(tenant, session_id)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def leases(clock: FakeClock) -> MemoryLeases:
    return MemoryLeases(clock)


@pytest.fixture
def sessions(store: MemoryStore, leases: MemoryLeases, clock: FakeClock) -> Sessions:
    return Sessions(store, leases, clock, SequentialIds())


def field_of(err: CorralError) -> str:
    assert err.violations, err
    return err.violations[0].field


def create_request(session_id: str = "", **fields: object) -> pb.CreateSessionRequest:
    session = pb.Session(
        agent="agents/demo", version="agents/demo/versions/1", version_digest=DIGEST
    )
    for key, value in fields.items():
        setattr(session, key, value)
    return pb.CreateSessionRequest(session_id=session_id, session=session)


@pytest.mark.parametrize("session_id", ["a b", "x" * 129, "a/b", "-leading", "é", "a*"])
def test_bad_session_ids_name_the_field(session_id: str) -> None:
    with pytest.raises(ResourceNameError) as info:
        new_session(create_request(session_id))
    assert info.value.field == "session_id"


@pytest.mark.parametrize("session_id", ["", "a", "x" * 128, "conv-1_a.b:c", "A9"])
def test_good_session_ids_pass(session_id: str) -> None:
    chosen, spec = new_session(create_request(session_id))
    assert chosen == (SessionRef(session_id) if session_id else None)
    assert spec == SPEC


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"agent": ""}, "session.agent"),
        ({"agent": "demo"}, "session.agent"),
        ({"version": ""}, "session.version"),
        ({"version": "agents/demo/versions/0"}, "session.version"),
        ({"version": "agents/demo/versions/latest"}, "session.version"),
        ({"version_digest": ""}, "session.version_digest"),
        ({"version_digest": "sha256:xyz"}, "session.version_digest"),
        ({"endpoint": "prod"}, "session.endpoint"),
    ],
)
def test_badly_named_pins_name_the_field(change: dict[str, str], field: str) -> None:
    with pytest.raises(ResourceNameError) as info:
        new_session(create_request(**change))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"pin": PinnedVersion(VersionRef("other", 1), DIGEST)}, "session.version"),
        ({"endpoint": EndpointRef("other", "prod")}, "session.endpoint"),
    ],
)
def test_pins_to_another_agent_name_the_field(change: dict[str, object], field: str) -> None:
    check_pin(dataclasses.replace(SPEC, endpoint=EndpointRef("demo", "prod")))
    with pytest.raises(InvalidArgument) as info:
        check_pin(dataclasses.replace(SPEC, **change))  # type: ignore[arg-type]
    assert field_of(info.value) == field


def test_timeouts_are_read_from_the_request() -> None:
    request = create_request(endpoint="agents/demo/endpoints/prod")
    request.session.idle_timeout.CopyFrom(duration_pb2.Duration(seconds=10, nanos=500_000_000))
    _, spec = new_session(request)
    assert (spec.idle_timeout_s, spec.max_lifetime_s) == (10.5, None)
    assert spec.endpoint == EndpointRef("demo", "prod")


def test_list_filters_are_parsed_and_checked() -> None:
    where = session_filter(
        pb.ListSessionsRequest(
            agent="agents/demo", version="agents/demo/versions/2", status=pb.SESSION_STATUS_ACTIVE
        )
    )
    assert where == SessionFilter(AgentRef("demo"), VersionRef("demo", 2), SessionStatus.ACTIVE)
    assert session_filter(pb.ListSessionsRequest()) == SessionFilter()
    for request, field in (
        (pb.ListSessionsRequest(version="agents/demo"), "version"),
        (pb.ListSessionsRequest(agent="demo"), "agent"),
    ):
        with pytest.raises(ResourceNameError) as info:
            session_filter(request)
        assert info.value.field == field
    with pytest.raises(InvalidArgument) as bad_status:
        session_filter(pb.ListSessionsRequest(status=42))  # type: ignore[arg-type]
    assert field_of(bad_status.value) == "status"


def test_retirement_requests() -> None:
    version = "agents/demo/versions/2"
    stop = pb.RetireVersionRequest(version=version, action=pb.RETIRE_ACTION_STOP)
    assert retirement(stop) == (VersionRef("demo", 2), None, None)
    migrate = pb.RetireVersionRequest(
        version=version,
        endpoint="agents/demo/endpoints/prod",
        action=pb.RETIRE_ACTION_MIGRATE,
        to_version="agents/demo/versions/1",
        to_version_digest=DIGEST,
    )
    assert retirement(migrate) == (
        VersionRef("demo", 2),
        EndpointRef("demo", "prod"),
        PinnedVersion(VersionRef("demo", 1), DIGEST),
    )
    with pytest.raises(InvalidArgument) as info:
        retirement(pb.RetireVersionRequest(version=version))
    assert field_of(info.value) == "action"
    for field, bad in (
        ("to_version", ""),
        ("to_version_digest", "sha256:"),
        ("version", "demo"),
        ("endpoint", "prod"),
    ):
        request = pb.RetireVersionRequest()
        request.CopyFrom(migrate)
        setattr(request, field, bad)
        with pytest.raises(ResourceNameError) as named:
            retirement(request)
        assert named.value.field == field


def test_lease_ttl_and_state_limits() -> None:
    assert lease_ttl(None) == 30
    assert lease_ttl(0.5) == 0.5
    with pytest.raises(InvalidArgument) as info:
        lease_ttl(3601)
    assert field_of(info.value) == "ttl"
    check_state_size(b"x" * MAX_STATE_BYTES)
    with pytest.raises(InvalidArgument) as info:
        check_state_size(b"x" * (MAX_STATE_BYTES + 1))
    assert field_of(info.value) == "state"
    assert str(MAX_STATE_BYTES) in info.value.message


async def test_create_applies_defaults_and_binds_the_caller(sessions: Sessions) -> None:
    record = await sessions.create(ALICE, None, SPEC)
    assert record.id == "id0001"
    assert (record.tenant, record.user) == ("acme", "alice")
    assert (record.idle_timeout_s, record.max_lifetime_s) == (
        DEFAULT_IDLE_TIMEOUT_S,
        DEFAULT_MAX_LIFETIME_S,
    )
    assert record.status is SessionStatus.ACTIVE and record.state_etag
    with pytest.raises(AlreadyExists, match="sessions/id0001"):
        await sessions.create(ALICE, ref("id0001"), SPEC)
    with pytest.raises(InvalidArgument) as info:
        await sessions.create(ALICE, ref("x"), dataclasses.replace(SPEC, idle_timeout_s=0.2))
    assert field_of(info.value) == "session.idle_timeout"


async def test_another_tenant_finds_no_such_session(sessions: Sessions) -> None:
    await sessions.create(ALICE, ref("s1"), SPEC)
    for call in (
        sessions.get(MALLORY, ref("s1")),
        sessions.get_state(MALLORY, ref("s1")),
        sessions.acquire_lease(MALLORY, ref("s1"), "x", None),
        sessions.delete(MALLORY, ref("s1")),
    ):
        with pytest.raises(NotFound, match="sessions/s1 not found"):
            await call
    assert (await sessions.get(ALICE, ref("s1"))).user == "alice"


async def test_same_id_in_two_tenants_is_two_sessions(sessions: Sessions) -> None:
    mine = await sessions.create(ALICE, ref("s1"), SPEC)
    theirs = await sessions.create(MALLORY, ref("s1"), SPEC)
    assert (mine.tenant, theirs.tenant) == ("acme", "evil")
    await sessions.update_state(MALLORY, ref("s1"), b"theirs", theirs.state_etag)
    assert (await sessions.get_state(ALICE, ref("s1"))).state == b""
    await sessions.delete(MALLORY, ref("s1"))
    assert (await sessions.get(ALICE, ref("s1"))).id == "s1"


async def test_in_a_tenant_roles_decide_who_reads_and_changes_a_session(
    sessions: Sessions,
) -> None:
    record = await sessions.create(ALICE, ref("s1"), SPEC)
    # Another invoker reads (roles are ordered: an invoker is a viewer too) but changes nothing.
    assert (await sessions.get(BOB, ref("s1"))).id == "s1"
    assert (await sessions.get(VERA_VIEWER, ref("s1"))).id == "s1"
    for other in (BOB, VERA_VIEWER):
        with pytest.raises(PermissionDenied, match="may not change sessions/s1"):
            await sessions.acquire_lease(other, ref("s1"), "x", None)
        with pytest.raises(PermissionDenied, match="may not change sessions/s1"):
            await sessions.update_state(other, ref("s1"), b"x", record.state_etag)
        with pytest.raises(PermissionDenied):
            await sessions.delete(other, ref("s1"))
    with pytest.raises(PermissionDenied, match="needs the viewer role"):
        await sessions.get(NOBODY, ref("s1"))
    with pytest.raises(PermissionDenied, match="needs the invoker role"):
        await sessions.create(VERA_VIEWER, ref("v1"), SPEC)
    # An operator changes any session of its tenant.
    state = await sessions.update_state(CAROL_OPERATOR, ref("s1"), b"fixed", record.state_etag)
    assert (await sessions.get_state(ALICE, ref("s1"))).etag == state.etag
    await sessions.stop(CAROL_OPERATOR, ref("s1"))
    with pytest.raises(NotFound, match="sessions/nope"):
        await sessions.get(ALICE, ref("nope"))


async def test_a_service_acting_for_every_tenant_must_name_one_for_a_session(
    sessions: Sessions,
) -> None:
    await sessions.create(ALICE, ref("s1"), SPEC)
    with pytest.raises(InvalidArgument, match="acts for no tenant"):
        await sessions.get(Principal.of_service("executor"), ref("s1"))
    acting = Principal.of_service("executor", tenant="acme")
    assert (await sessions.acquire_lease(acting, ref("s1"), "x", None)).session_id == "s1"
    await sessions.create(MALLORY, ref("t1"), SPEC)
    listed = await sessions.list(Principal.of_service("ops"), SessionFilter(), 0, "")
    assert {(r.tenant, r.id) for r in listed.items} == {("acme", "s1"), ("evil", "t1")}


async def test_idle_and_lifetime_expiry_is_persisted_and_blocks_leases(
    sessions: Sessions, store: MemoryStore, clock: FakeClock
) -> None:
    await sessions.create(ALICE, ref("idle"), dataclasses.replace(SPEC, idle_timeout_s=10))
    await sessions.create(ALICE, ref("old"), dataclasses.replace(SPEC, max_lifetime_s=20))
    clock.advance(9)
    lease = await sessions.acquire_lease(ALICE, ref("old"), "h", None)
    assert lease.state is not None
    await sessions.commit_turn(
        ALICE, ref("old"), lease.lease_id, lease.state.etag, b"s", Turn("i", b"", b"")
    )
    assert (await sessions.get(ALICE, ref("idle"))).status is SessionStatus.ACTIVE
    clock.advance(2)
    assert (await sessions.get(ALICE, ref("idle"))).status is SessionStatus.EXPIRED
    assert store.records[key("idle")].status is SessionStatus.EXPIRED
    # Activity keeps "old" from going idle, but not past its max lifetime.
    assert (await sessions.get(ALICE, ref("old"))).status is SessionStatus.ACTIVE
    clock.advance(10)
    page = await sessions.list(ALICE, SessionFilter(status=SessionStatus.EXPIRED), 0, "")
    assert [r.id for r in page.items] == ["old", "idle"]  # created together: by id, descending
    with pytest.raises(FailedPrecondition, match="expired") as info:
        await sessions.acquire_lease(ALICE, ref("old"), "h", None)
    assert info.value.reason == "SESSION_EXPIRED"


async def test_stop_is_idempotent_and_refuses_new_leases(sessions: Sessions) -> None:
    await sessions.create(ALICE, ref("s"), SPEC)
    assert (await sessions.stop(ALICE, ref("s"))).status is SessionStatus.STOPPED
    assert (await sessions.stop(ALICE, ref("s"))).status is SessionStatus.STOPPED
    with pytest.raises(FailedPrecondition, match="stopped"):
        await sessions.acquire_lease(ALICE, ref("s"), "h", None)


async def test_lease_is_exclusive_until_released_or_expired(
    sessions: Sessions, clock: FakeClock
) -> None:
    await sessions.create(ALICE, ref("s"), SPEC)
    first = await sessions.acquire_lease(ALICE, ref("s"), "exec-a", 5)
    assert first.state is not None and first.state.turn_count == 0
    with pytest.raises(Aborted, match="session sessions/s is busy") as info:
        await sessions.acquire_lease(ALICE, ref("s"), "exec-b", 5)
    assert info.value.reason == "SESSION_BUSY"
    assert (await sessions.renew_lease(ALICE, ref("s"), first.lease_id, 5)).holder == "exec-a"
    await sessions.release_lease(ALICE, ref("s"), "someone-else")  # not ours: no-op
    with pytest.raises(Aborted):
        await sessions.acquire_lease(ALICE, ref("s"), "exec-b", 5)
    clock.advance(6)
    with pytest.raises(Aborted) as info:
        await sessions.renew_lease(ALICE, ref("s"), first.lease_id, 5)
    assert info.value.reason == "LEASE_LOST"
    second = await sessions.acquire_lease(ALICE, ref("s"), "exec-b", 5)
    await sessions.release_lease(ALICE, ref("s"), second.lease_id)
    await sessions.release_lease(ALICE, ref("s"), second.lease_id)  # idempotent


async def test_commit_turn_is_compare_and_set(sessions: Sessions, store: MemoryStore) -> None:
    await sessions.create(ALICE, ref("s"), SPEC)
    lease = await sessions.acquire_lease(ALICE, ref("s"), "h", None)
    assert lease.state is not None
    saved = await sessions.commit_turn(
        ALICE,
        ref("s"),
        lease.lease_id,
        lease.state.etag,
        b'{"n":1}',
        Turn("inv1", b"hi", b"yo"),
    )
    assert saved.turn_count == 1 and saved.etag != lease.state.etag
    with pytest.raises(Aborted, match="re-read") as info:
        await sessions.commit_turn(
            ALICE, ref("s"), lease.lease_id, lease.state.etag, b"stale", Turn("inv2", b"", b"")
        )
    assert info.value.reason == "STATE_CONFLICT"
    assert store.states[key("s")] == b'{"n":1}' and store.records[key("s")].turn_count == 1
    assert [(seq, t.invocation_id) for seq, t in store.events[key("s")]] == [(1, "inv1")]
    await sessions.release_lease(ALICE, ref("s"), lease.lease_id)
    with pytest.raises(Aborted) as info:
        await sessions.commit_turn(
            ALICE, ref("s"), lease.lease_id, saved.etag, b"x", Turn("i", b"", b"")
        )
    assert info.value.reason == "LEASE_LOST"
    assert store.states[key("s")] == b'{"n":1}'


async def test_update_state_needs_the_current_etag(sessions: Sessions) -> None:
    record = await sessions.create(ALICE, ref("s"), SPEC)
    with pytest.raises(InvalidArgument):
        await sessions.update_state(ALICE, ref("s"), b"x", "")
    updated = await sessions.update_state(ALICE, ref("s"), b"x", record.state_etag)
    assert updated.turn_count == 0
    with pytest.raises(Aborted):
        await sessions.update_state(ALICE, ref("s"), b"y", record.state_etag)
    assert (await sessions.get_state(ALICE, ref("s"))).state == b"x"


async def test_list_pages_within_the_tenant(sessions: Sessions, clock: FakeClock) -> None:
    for i in range(7):
        await sessions.create(ALICE if i % 2 == 0 else BOB, ref(f"s{i}"), SPEC)
        if i % 3 == 0:
            clock.advance(1)  # some share a create_time: the id breaks the tie
    await sessions.create(MALLORY, ref("theirs"), SPEC)
    seen: list[str] = []
    token = ""
    while True:
        page = await sessions.list(ALICE, SessionFilter(), 3, token)
        assert len(page.items) <= 3
        seen += [r.id for r in page.items]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"s{i}" for i in reversed(range(7))]  # newest first
    assert (await sessions.list(MALLORY, SessionFilter(), 0, "")).items[0].id == "theirs"


async def test_page_tokens_continue_only_their_own_listing(sessions: Sessions) -> None:
    for i in range(3):
        await sessions.create(ALICE, ref(f"s{i}"), SPEC)
    await sessions.create(MALLORY, ref("theirs"), SPEC)
    token = (await sessions.list(ALICE, SessionFilter(), 1, "")).next_page_token
    assert token
    assert [r.id for r in (await sessions.list(ALICE, SessionFilter(), 5, token)).items] == [
        "s1",
        "s0",
    ]
    # Another tenant, another filter, or a token that is not one: page_token is wrong.
    for caller, where, bad in (
        (MALLORY, SessionFilter(), token),
        (ALICE, SessionFilter(status=SessionStatus.ACTIVE), token),
        (ALICE, SessionFilter(), "garbage!"),
        (ALICE, SessionFilter(), token[:-3] + "%%%"),
    ):
        with pytest.raises(InvalidArgument) as info:
            await sessions.list(caller, where, 1, bad)
        assert field_of(info.value) == "page_token"


async def test_page_size_defaults_caps_and_refuses_negative(sessions: Sessions) -> None:
    for i in range(60):
        await sessions.create(ALICE, ref(f"s{i:02d}"), SPEC)
    assert len((await sessions.list(ALICE, SessionFilter(), 0, "")).items) == 50
    assert len((await sessions.list(ALICE, SessionFilter(), 7, "")).items) == 7
    assert len((await sessions.list(ALICE, SessionFilter(), 5000, "")).items) == 60
    with pytest.raises(InvalidArgument) as info:
        await sessions.list(ALICE, SessionFilter(), -1, "")
    assert field_of(info.value) == "page_size"


async def test_retiring_a_version_migrates_or_stops_its_active_sessions(
    sessions: Sessions, store: MemoryStore
) -> None:
    prod = EndpointRef("demo", "prod")
    on_prod = dataclasses.replace(SPEC, endpoint=prod)
    await sessions.create(ALICE, ref("a"), on_prod)
    await sessions.create(MALLORY, ref("b"), on_prod)
    await sessions.create(ALICE, ref("direct"), SPEC)
    await sessions.create(ALICE, ref("ended"), on_prod)
    await sessions.stop(ALICE, ref("ended"))
    stable = PinnedVersion(VersionRef("demo", 7), "sha256:" + "cd" * 32)
    # A service acting for every tenant retires across tenants.
    platform = Principal.of_service("registry")
    assert await sessions.retire_version(platform, SPEC.pin.version, prod, stable) == 2
    moved = (store.records[key("a")], store.records[key("b", "evil")])
    assert {r.version for r in moved} == {"agents/demo/versions/7"}
    assert store.records[key("a")].version_digest == stable.digest
    kept = (store.records[key("direct")], store.records[key("ended")])
    assert {r.version for r in kept} == {SPEC.pin.version.name}
    # Without an endpoint, every session on the version; without a target, they stop. Anyone
    # but a service acting for all retires in its own tenant only.
    assert await sessions.retire_version(ALICE, SPEC.pin.version, None, None) == 1
    assert store.records[key("direct")].status is SessionStatus.STOPPED
    assert store.records[key("a")].status is SessionStatus.ACTIVE


class RecordingSandboxes:
    """The executor as DeleteSession asks it to end a sandbox; `fail` makes it unreachable."""

    def __init__(self, fail: bool = False) -> None:
        self.stopped: list[tuple[str, SessionRef]] = []
        self.fail = fail

    async def stop_sandbox(self, caller: Caller, session: SessionRef) -> None:
        if self.fail:
            raise Unavailable("executor is unavailable; retry shortly")
        self.stopped.append((caller.user, session))


@pytest.mark.parametrize("unreachable", [False, True])
async def test_deleting_a_live_session_ends_its_sandbox_first(
    store: MemoryStore, leases: MemoryLeases, clock: FakeClock, unreachable: bool
) -> None:
    sandboxes = RecordingSandboxes(fail=unreachable)
    sessions = Sessions(store, leases, clock, SequentialIds(), sandboxes=sandboxes)
    await sessions.create(ALICE, ref("live"), SPEC)
    await sessions.create(ALICE, ref("ended"), SPEC)
    await sessions.stop(ALICE, ref("ended"))
    await sessions.delete(ALICE, ref("live"))
    await sessions.delete(ALICE, ref("ended"))
    # Only the live one had a sandbox to end; an executor out of reach does not stop the delete.
    assert sandboxes.stopped == ([] if unreachable else [("alice", ref("live"))])
    assert not store.records


async def test_delete_removes_the_lease_too(sessions: Sessions, leases: MemoryLeases) -> None:
    await sessions.create(ALICE, ref("s"), SPEC)
    await sessions.acquire_lease(ALICE, ref("s"), "h", None)
    await sessions.delete(ALICE, ref("s"))
    assert key("s") not in leases.leases
    with pytest.raises(NotFound):
        await sessions.get_state(ALICE, ref("s"))
