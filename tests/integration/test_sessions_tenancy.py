"""Sessions across tenants and users: another tenant's session is not there for it (NOT_FOUND,
nothing changed), the same session id in two tenants is two sessions, and within a tenant roles
decide who reads and who changes. Real grpc.aio server, PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import TypeAlias

import grpc
import pytest
import pytest_asyncio

from corral.names import SessionRef
from corral.sessions.v1 import sessions_pb2 as pb
from corral.sessions.v1 import sessions_pb2_grpc
from services.common import db
from services.common.auth.principal import Principal, Role
from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.common.kv import KeySpace, create_redis
from services.common.settings import Settings
from services.sessions import messages
from services.sessions.model import Turn
from services.sessions.sessions import Sessions
from services.sessions.store import PgSessionStore, RecordCache, RedisLeases
from tests.credentials import internal_channel
from tests.harness import Platform
from tests.integration.test_sessions import new_session
from tests.rpc import Metadata, error_details, fails, new_tenant, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Stub: TypeAlias = "sessions_pb2_grpc.SessionsServiceAsyncStub"


@pytest_asyncio.fixture
async def stub(services: Platform) -> AsyncIterator[Stub]:
    await services.start("sessions")
    # The executor's view: it relays users' calls (and may call the lease and turn methods).
    async with internal_channel(services.settings, "sessions", "executor") as channel:
        yield sessions_pb2_grpc.SessionsServiceStub(channel)


async def _started(stub: Stub, me: Metadata, session_id: str) -> tuple[pb.Session, pb.Lease]:
    """A session with one committed turn, and a lease on it still held."""
    created = await stub.CreateSession(
        pb.CreateSessionRequest(session_id=session_id, session=new_session()), metadata=me
    )
    lease = await stub.AcquireLease(
        pb.AcquireLeaseRequest(session=created.name, holder="exec-a"), metadata=me
    )
    state = await stub.CommitTurn(
        pb.CommitTurnRequest(
            session=created.name, lease_id=lease.lease_id, etag=lease.state.etag,
            state=b"secret", invocation_id="inv-1", input=b"q", output=b"a",
        ),
        metadata=me,
    )
    lease.state.CopyFrom(state)
    return created, lease


async def test_another_tenant_can_neither_read_nor_change_a_session(stub: Stub) -> None:
    owner, attacker = new_tenant(), new_tenant()
    # The attacker even names the same user: only the tenant tells them apart.
    mine, theirs = who(owner, "alice"), who(attacker, "alice")
    session, lease = await _started(stub, mine, f"{owner}-s1")
    name, etag = session.name, lease.state.etag

    attempts: dict[str, Awaitable[object]] = {
        "GetSession": stub.GetSession(pb.GetSessionRequest(name=name), metadata=theirs),
        "GetSessionState": stub.GetSessionState(
            pb.GetSessionStateRequest(name=name), metadata=theirs
        ),
        "UpdateSessionState": stub.UpdateSessionState(
            pb.UpdateSessionStateRequest(name=name, state=b"pwned", etag=etag), metadata=theirs
        ),
        "StopSession": stub.StopSession(pb.StopSessionRequest(name=name), metadata=theirs),
        "AcquireLease": stub.AcquireLease(
            pb.AcquireLeaseRequest(session=name, holder="x"), metadata=theirs
        ),
        "RenewLease": stub.RenewLease(
            pb.RenewLeaseRequest(session=name, lease_id=lease.lease_id), metadata=theirs
        ),
        "ReleaseLease": stub.ReleaseLease(
            pb.ReleaseLeaseRequest(session=name, lease_id=lease.lease_id), metadata=theirs
        ),
        "CommitTurn": stub.CommitTurn(
            pb.CommitTurnRequest(
                session=name, lease_id=lease.lease_id, etag=etag, state=b"forged",
                invocation_id="forged", input=b"x", output=b"y",
            ),
            metadata=theirs,
        ),
        "DeleteSession": stub.DeleteSession(pb.DeleteSessionRequest(name=name), metadata=theirs),
    }
    for method, call in attempts.items():
        err = await fails(grpc.StatusCode.NOT_FOUND, call)
        assert err.details() == f"{name} not found; create it with CreateSession", method
    listed = await stub.ListSessions(pb.ListSessionsRequest(), metadata=theirs)
    assert name not in {s.name for s in listed.sessions}

    # Nothing changed: the state, its turn, the status, and the lease (its holder still renews).
    state = await stub.GetSessionState(pb.GetSessionStateRequest(name=name), metadata=mine)
    assert (state.state, state.etag, state.turn_count) == (b"secret", etag, 1)
    got = await stub.GetSession(pb.GetSessionRequest(name=name), metadata=mine)
    assert got.status == pb.SESSION_STATUS_ACTIVE and (got.tenant, got.user) == (owner, "alice")
    await stub.RenewLease(
        pb.RenewLeaseRequest(session=name, lease_id=lease.lease_id), metadata=mine
    )


async def test_another_tenants_session_cannot_be_told_from_none(stub: Stub) -> None:
    owner, attacker = new_tenant(), new_tenant()
    existing, _ = await _started(stub, who(owner), f"{owner}-probe")
    absent = f"sessions/{owner}-never"

    async def probe(name: str) -> tuple[str, str]:
        """What the attacker learns of `name`: the message (the name left out) and details."""
        err = await fails(
            grpc.StatusCode.NOT_FOUND,
            stub.GetSession(pb.GetSessionRequest(name=name), metadata=who(attacker)),
        )
        return (err.details() or "").replace(name, "<name>"), repr(error_details(err))

    assert await probe(existing.name) == await probe(absent)


async def test_the_same_session_id_in_two_tenants_is_two_sessions(stub: Stub) -> None:
    a, b = who(new_tenant()), who(new_tenant())
    shared = f"shared-{new_tenant()}"
    session_a, lease_a = await _started(stub, a, shared)
    # Tenant b creates "its" session under the same id: no ALREADY_EXISTS, its own record.
    session_b = await stub.CreateSession(
        pb.CreateSessionRequest(session_id=shared, session=new_session(n=2)), metadata=b
    )
    assert session_b.name == session_a.name and session_b.version == "agents/demo/versions/2"
    # Each has its own lease (a's is still held) and its own state.
    lease_b = await stub.AcquireLease(
        pb.AcquireLeaseRequest(session=session_b.name, holder="exec-b"), metadata=b
    )
    assert lease_b.state.turn_count == 0 and lease_b.state.state == b""
    await stub.CommitTurn(
        pb.CommitTurnRequest(
            session=session_b.name, lease_id=lease_b.lease_id,
            etag=lease_b.state.etag, state=b"b's", invocation_id="b-1",
        ),
        metadata=b,
    )
    state_a = await stub.GetSessionState(
        pb.GetSessionStateRequest(name=session_a.name), metadata=a
    )
    assert (state_a.state, state_a.turn_count) == (b"secret", 1)
    # Deleting b's leaves a's, lease included.
    await stub.DeleteSession(pb.DeleteSessionRequest(name=session_b.name), metadata=b)
    await fails(
        grpc.StatusCode.NOT_FOUND,
        stub.GetSession(pb.GetSessionRequest(name=session_b.name), metadata=b),
    )
    got_a = await stub.GetSession(pb.GetSessionRequest(name=session_a.name), metadata=a)
    assert got_a.turn_count == 1
    await stub.RenewLease(
        pb.RenewLeaseRequest(session=session_a.name, lease_id=lease_a.lease_id), metadata=a
    )


@pytest_asyncio.fixture
async def sessions(stub: Stub, settings: Settings) -> AsyncIterator[Sessions]:
    """The sessions domain on the same PostgreSQL and Redis as the service started by `stub`
    (which applied the migrations), for callers with roles the test chooses."""
    pool = await db.create_pool(settings.require_database())
    client = create_redis(settings.require_redis())
    keys = KeySpace(settings.redis_prefix)
    try:
        yield Sessions(PgSessionStore(pool, RecordCache(client, keys)), RedisLeases(client, keys))
    finally:
        await client.aclose()
        await pool.close()


def _in(tenant: str, user: str, role: Role) -> Principal:
    return Principal(tenant=tenant, subject=user, roles=frozenset({role}))


async def test_in_a_tenant_invokers_change_their_own_and_operators_any(
    sessions: Sessions,
) -> None:
    tenant = new_tenant()
    alice, bob = _in(tenant, "alice", Role.INVOKER), _in(tenant, "bob", Role.INVOKER)
    viewer, operator = _in(tenant, "vera", Role.VIEWER), _in(tenant, "olga", Role.OPERATOR)
    session = SessionRef(f"{tenant}-alices")
    _, spec = messages.new_session(pb.CreateSessionRequest(session=new_session()))
    record = await sessions.create(alice, session, spec)

    # Reading is a viewer's right, and every higher role has it.
    for reader in (bob, viewer, operator):
        assert (await sessions.get(reader, session)).user == "alice"
    # Changing another user's session: PERMISSION_DENIED (same tenant, so existence is no secret).
    for other in (bob, viewer):
        with pytest.raises(PermissionDenied):
            await sessions.update_state(other, session, b"bob was here", record.state_etag)
        with pytest.raises(PermissionDenied):
            await sessions.acquire_lease(other, session, "exec-x", None)
        with pytest.raises(PermissionDenied):
            await sessions.delete(other, session)
    assert (await sessions.get_state(alice, session)).etag == record.state_etag
    with pytest.raises(PermissionDenied, match="needs the invoker role"):
        await sessions.create(viewer, SessionRef(f"{tenant}-vera"), spec)

    # An operator continues anyone's session of the tenant.
    lease = await sessions.acquire_lease(operator, session, "exec-o", None)
    assert lease.state is not None
    await sessions.commit_turn(
        operator, session, lease.lease_id, lease.state.etag, b"by olga", Turn("o-1", b"", b"")
    )
    assert (await sessions.get_state(alice, session)).state == b"by olga"

    # Another tenant's operator still finds nothing.
    with pytest.raises(NotFound):
        await sessions.get(_in(new_tenant(), "olga", Role.ADMIN), session)
    # A service must say which tenant it acts in before it can address one session.
    with pytest.raises(InvalidArgument, match="acts for no tenant"):
        await sessions.get(Principal.of_service("executor"), session)
    acting = Principal.of_service("executor", tenant=tenant)
    assert (await sessions.get(acting, session)).turn_count == 1
