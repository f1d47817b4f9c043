"""The sessions service as a client sees it: real grpc.aio server, real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

import asyncpg
import grpc
import pytest
import pytest_asyncio
from google.protobuf import duration_pb2

from corral.sessions.v1 import fleet_pb2, fleet_pb2_grpc, sessions_pb2_grpc
from corral.sessions.v1 import sessions_pb2 as pb
from services.common.auth.interceptor import TENANT_KEY
from services.common.kv import create_redis
from services.common.settings import Settings
from tests.credentials import internal_channel
from tests.fleet import beat, platform_admin
from tests.harness import Platform
from tests.rpc import error_details, fails, new_tenant, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DIGEST = "sha256:" + "0f" * 32
EIGHT_MIB = 8 * 1024 * 1024


def new_session(agent: str = "demo", n: int = 1, **fields: object) -> pb.Session:
    return pb.Session(
        agent=f"agents/{agent}",
        version=f"agents/{agent}/versions/{n}",
        version_digest=DIGEST,
        **fields,  # type: ignore[arg-type]
    )


@pytest_asyncio.fixture
async def stub(
    services: Platform,
) -> AsyncIterator[sessions_pb2_grpc.SessionsServiceAsyncStub]:
    await services.start("sessions")
    async with internal_channel(services.settings, "sessions", "executor") as channel:
        yield sessions_pb2_grpc.SessionsServiceStub(channel)


@pytest_asyncio.fixture
async def fleet(
    services: Platform, stub: sessions_pb2_grpc.SessionsServiceAsyncStub
) -> AsyncIterator[fleet_pb2_grpc.FleetServiceAsyncStub]:
    """FleetService as the executors call it, on the sessions service `stub` started."""
    async with internal_channel(services.settings, "sessions", "executor") as channel:
        yield fleet_pb2_grpc.FleetServiceStub(channel)


@pytest.fixture
def tenant() -> str:
    return new_tenant()


async def test_create_get_list_and_tenants_see_only_their_own(
    stub: sessions_pb2_grpc.SessionsServiceAsyncStub, tenant: str
) -> None:
    me, other = who(tenant), who(tenant + "-other")
    # Tenant and user in the body are ignored: they come from the caller.
    created = await stub.CreateSession(
        pb.CreateSessionRequest(
            session_id=f"{tenant}-a", session=new_session(tenant="evil", user="root")
        ),
        metadata=me,
    )
    assert created.name == f"sessions/{tenant}-a"
    assert (created.tenant, created.user) == (tenant, "alice")
    assert created.status == pb.SESSION_STATUS_ACTIVE and created.turn_count == 0
    assert created.idle_timeout.seconds == 900 and created.max_lifetime.seconds == 28800
    assert created.state_etag and created.version == "agents/demo/versions/1"
    generated = await stub.CreateSession(
        pb.CreateSessionRequest(session=new_session()), metadata=me
    )
    assert len(generated.name.removeprefix("sessions/")) == 32

    got = await stub.GetSession(pb.GetSessionRequest(name=created.name), metadata=me)
    assert got == created
    listed = await stub.ListSessions(pb.ListSessionsRequest(), metadata=me)
    assert {s.name for s in listed.sessions} == {created.name, generated.name}

    assert not (await stub.ListSessions(pb.ListSessionsRequest(), metadata=other)).sessions
    # Another tenant's session is not there for it (test_sessions_tenancy.py has the rest).
    err = await fails(
        grpc.StatusCode.NOT_FOUND,
        stub.GetSession(pb.GetSessionRequest(name=created.name), metadata=other),
    )
    assert f"{created.name} not found" in (err.details() or "")
    err = await fails(
        grpc.StatusCode.NOT_FOUND,
        stub.GetSession(pb.GetSessionRequest(name=f"sessions/{tenant}-zz"), metadata=me),
    )
    assert f"sessions/{tenant}-zz" in (err.details() or "")


async def test_duplicate_ids_bad_ids_and_bad_versions_are_refused(
    stub: sessions_pb2_grpc.SessionsServiceAsyncStub, tenant: str
) -> None:
    me = who(tenant)
    await stub.CreateSession(
        pb.CreateSessionRequest(session_id=f"{tenant}-dup", session=new_session()), metadata=me
    )
    err = await fails(
        grpc.StatusCode.ALREADY_EXISTS,
        stub.CreateSession(
            pb.CreateSessionRequest(session_id=f"{tenant}-dup", session=new_session()), metadata=me
        ),
    )
    assert f"sessions/{tenant}-dup" in (err.details() or "")

    for bad_id in ("has space", "x" * 129, "a/b", "ünicode"):
        err = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.CreateSession(
                pb.CreateSessionRequest(session_id=bad_id, session=new_session()), metadata=me
            ),
        )
        assert error_details(err)[1] == ["session_id"], bad_id
    bad_versions = {
        "agents/demo/versions/0": "session.version",
        "agents/demo/versions/v1": "session.version",
        "agents/other/versions/1": "session.version",
        "demo/1": "session.version",
        "": "session.version",
    }
    for version, field in bad_versions.items():
        session = new_session()
        session.version = version
        err = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.CreateSession(pb.CreateSessionRequest(session=session), metadata=me),
        )
        assert error_details(err)[1] == [field], version
    session = new_session()
    session.agent = ""
    err = await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.CreateSession(pb.CreateSessionRequest(session=session), metadata=me),
    )
    assert error_details(err)[1] == ["session.agent"]
    # Nothing was half-written by the refused calls.
    assert len((await stub.ListSessions(pb.ListSessionsRequest(), metadata=me)).sessions) == 1


async def test_lease_is_exclusive_and_commit_is_compare_and_set(
    stub: sessions_pb2_grpc.SessionsServiceAsyncStub, fleet: fleet_pb2_grpc.FleetServiceAsyncStub,
    tenant: str,
) -> None:
    me = who(tenant)
    name = (
        await stub.CreateSession(pb.CreateSessionRequest(session=new_session()), metadata=me)
    ).name
    lease = await stub.AcquireLease(
        pb.AcquireLeaseRequest(session=name, holder="exec-1"), metadata=me
    )
    assert lease.lease_id and lease.holder == "exec-1" and lease.state.turn_count == 0

    # exec-1 is a live member of the fleet: exec-2, where the session is not placed, is told so.
    await fleet.Heartbeat(beat("exec-1"))
    err = await fails(
        grpc.StatusCode.FAILED_PRECONDITION,
        stub.AcquireLease(pb.AcquireLeaseRequest(session=name, holder="exec-2"), metadata=me),
    )
    info = error_details(err)[0]
    assert info.reason == "SESSION_HELD_ELSEWHERE" and info.metadata["executor"] == "executors/exec-1"

    renewed = await stub.RenewLease(
        pb.RenewLeaseRequest(
            session=name, lease_id=lease.lease_id, ttl=duration_pb2.Duration(seconds=60)
        ),
        metadata=me,
    )
    assert renewed.expire_time.ToDatetime() > lease.expire_time.ToDatetime()

    def commit(
        etag: str, state: bytes, invocation_id: str = "", input: bytes = b"", output: bytes = b""
    ) -> Awaitable[pb.SessionState]:
        """CommitTurn under the lease taken above."""
        return stub.CommitTurn(
            pb.CommitTurnRequest(
                session=name,
                lease_id=lease.lease_id,
                etag=etag,
                state=state,
                invocation_id=invocation_id,
                input=input,
                output=output,
            ),
            metadata=me,
        )

    saved = await commit(lease.state.etag, b'{"step": 1}', "inv-1", input=b"hello", output=b"hi")
    assert saved.turn_count == 1 and saved.etag != lease.state.etag

    err = await fails(grpc.StatusCode.ABORTED, commit(lease.state.etag, b"stale", "inv-2"))
    assert error_details(err)[0].reason == "STATE_CONFLICT" and "re-read" in (err.details() or "")
    state = await stub.GetSessionState(pb.GetSessionStateRequest(name=name), metadata=me)
    assert (state.state, state.etag, state.turn_count) == (b'{"step": 1}', saved.etag, 1)

    await stub.ReleaseLease(
        pb.ReleaseLeaseRequest(session=name, lease_id=lease.lease_id), metadata=me
    )
    await stub.ReleaseLease(
        pb.ReleaseLeaseRequest(session=name, lease_id=lease.lease_id), metadata=me
    )
    err = await fails(grpc.StatusCode.ABORTED, commit(saved.etag, b"late"))
    assert error_details(err)[0].reason == "LEASE_LOST"
    err = await fails(
        grpc.StatusCode.ABORTED,
        stub.RenewLease(pb.RenewLeaseRequest(session=name, lease_id=lease.lease_id), metadata=me),
    )
    assert error_details(err)[0].reason == "LEASE_LOST"
    state = await stub.GetSessionState(pb.GetSessionStateRequest(name=name), metadata=me)
    assert (state.state, state.turn_count) == (b'{"step": 1}', 1)

    # Released, the session can be leased again, by exactly one of several racing executors of
    # the fleet; the others are told which one holds it.
    await asyncio.gather(*(fleet.Heartbeat(beat(f"h{i}")) for i in range(6)))
    results = await asyncio.gather(
        *(
            stub.AcquireLease(pb.AcquireLeaseRequest(session=name, holder=f"h{i}"), metadata=me)
            for i in range(6)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, pb.Lease)]
    assert len(winners) == 1 and winners[0].state.etag == saved.etag
    assert all(
        isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.FAILED_PRECONDITION
        and error_details(r)[0].metadata["executor"] == f"executors/{winners[0].holder}"
        for r in results
        if r not in winners
    )


async def test_state_survives_a_restart_and_a_redis_flush(
    services: Platform, settings: Settings, database_url: str, tenant: str
) -> None:
    me = who(tenant)
    hosts = await services.start("sessions")
    async with internal_channel(services.settings, "sessions", "executor") as channel:
        stub = sessions_pb2_grpc.SessionsServiceStub(channel)
        name = (
            await stub.CreateSession(pb.CreateSessionRequest(session=new_session()), metadata=me)
        ).name
        etag = ""
        for turn in (1, 2):
            lease = await stub.AcquireLease(
                pb.AcquireLeaseRequest(session=name, holder="e"), metadata=me
            )
            saved = await stub.CommitTurn(
                pb.CommitTurnRequest(
                    session=name,
                    lease_id=lease.lease_id,
                    etag=lease.state.etag,
                    state=f"turn {turn}".encode(),
                    invocation_id=f"inv-{turn}",
                    input=f"in {turn}".encode(),
                    output=f"out {turn}".encode(),
                ),
                metadata=me,
            )
            await stub.ReleaseLease(
                pb.ReleaseLeaseRequest(session=name, lease_id=lease.lease_id), metadata=me
            )
            etag = saved.etag
        before = await stub.GetSession(pb.GetSessionRequest(name=name), metadata=me)

    await hosts["sessions"].stop(grace=0.5)
    redis = create_redis(settings.require_redis())
    try:
        keys = [k async for k in redis.scan_iter(match=settings.redis_prefix + "*")]
        assert keys, "the record cache should have had entries under the prefix"
        await redis.delete(*keys)
    finally:
        await redis.aclose()

    await services.start("sessions")
    async with internal_channel(services.settings, "sessions", "executor") as channel:
        stub = sessions_pb2_grpc.SessionsServiceStub(channel)
        after = await stub.GetSession(pb.GetSessionRequest(name=name), metadata=me)
        assert after == before and after.turn_count == 2 and after.state_etag == etag
        state = await stub.GetSessionState(pb.GetSessionStateRequest(name=name), metadata=me)
        assert (state.state, state.etag, state.turn_count) == (b"turn 2", etag, 2)
        lease = await stub.AcquireLease(
            pb.AcquireLeaseRequest(session=name, holder="e"), metadata=me
        )
        assert lease.state.state == b"turn 2"

    conn = await asyncpg.connect(database_url)
    try:
        events = await conn.fetch(
            """SELECT seq, invocation_id, input, output FROM sessions.session_events
               WHERE session_id = $1 ORDER BY seq""",
            name.removeprefix("sessions/"),
        )
    finally:
        await conn.close()
    assert [
        (e["seq"], e["invocation_id"], bytes(e["input"]), bytes(e["output"])) for e in events
    ] == [
        (1, "inv-1", b"in 1", b"out 1"),
        (2, "inv-2", b"in 2", b"out 2"),
    ]


async def test_a_session_expires_after_its_idle_timeout(
    stub: sessions_pb2_grpc.SessionsServiceAsyncStub, tenant: str
) -> None:
    me = who(tenant)
    session = new_session(
        idle_timeout=duration_pb2.Duration(seconds=1),
        max_lifetime=duration_pb2.Duration(seconds=60),
    )
    name = (await stub.CreateSession(pb.CreateSessionRequest(session=session), metadata=me)).name
    kept = (
        await stub.CreateSession(pb.CreateSessionRequest(session=new_session()), metadata=me)
    ).name
    assert (
        await stub.GetSession(pb.GetSessionRequest(name=name), metadata=me)
    ).status == pb.SESSION_STATUS_ACTIVE
    await asyncio.sleep(1.3)
    listed = await stub.ListSessions(
        pb.ListSessionsRequest(status=pb.SESSION_STATUS_EXPIRED), metadata=me
    )
    assert [s.name for s in listed.sessions] == [name]
    assert (
        await stub.GetSession(pb.GetSessionRequest(name=name), metadata=me)
    ).status == pb.SESSION_STATUS_EXPIRED
    err = await fails(
        grpc.StatusCode.FAILED_PRECONDITION,
        stub.AcquireLease(pb.AcquireLeaseRequest(session=name), metadata=me),
    )
    assert "expired" in (err.details() or "")
    active = await stub.ListSessions(
        pb.ListSessionsRequest(status=pb.SESSION_STATUS_ACTIVE), metadata=me
    )
    assert [s.name for s in active.sessions] == [kept]


async def test_paging_through_more_than_a_page(
    stub: sessions_pb2_grpc.SessionsServiceAsyncStub, tenant: str
) -> None:
    me = who(tenant)
    created = []
    for i in range(12):
        agent = "demo" if i % 4 else "other"
        s = await stub.CreateSession(
            pb.CreateSessionRequest(session_id=f"{tenant}-{i:02d}", session=new_session(agent)),
            metadata=me,
        )
        created.append(s.name)
    seen: list[str] = []
    token, pages = "", 0
    while True:
        page = await stub.ListSessions(
            pb.ListSessionsRequest(page_size=5, page_token=token), metadata=me
        )
        assert len(page.sessions) <= 5
        seen += [s.name for s in page.sessions]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == created[::-1] and pages == 3  # newest first
    others = await stub.ListSessions(pb.ListSessionsRequest(agent="agents/other"), metadata=me)
    assert [s.name for s in others.sessions] == created[::4][::-1]
    by_version = await stub.ListSessions(
        pb.ListSessionsRequest(version="agents/demo/versions/1"), metadata=me
    )
    assert len(by_version.sessions) == 9
    err = await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.ListSessions(pb.ListSessionsRequest(page_token="not-a-token"), metadata=me),
    )
    assert error_details(err)[1] == ["page_token"]


async def test_state_size_limit(
    stub: sessions_pb2_grpc.SessionsServiceAsyncStub, tenant: str
) -> None:
    me = who(tenant)
    created = await stub.CreateSession(pb.CreateSessionRequest(session=new_session()), metadata=me)
    err = await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.UpdateSessionState(
            pb.UpdateSessionStateRequest(
                name=created.name, state=b"x" * (EIGHT_MIB + 1), etag=created.state_etag
            ),
            metadata=me,
        ),
    )
    assert error_details(err)[1] == ["state"] and str(EIGHT_MIB) in (err.details() or "")
    full = await stub.UpdateSessionState(
        pb.UpdateSessionStateRequest(
            name=created.name, state=b"y" * EIGHT_MIB, etag=created.state_etag
        ),
        metadata=me,
    )
    lease = await stub.AcquireLease(pb.AcquireLeaseRequest(session=created.name), metadata=me)
    assert lease.state.state == b"y" * EIGHT_MIB and lease.state.etag == full.etag
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.CommitTurn(
            pb.CommitTurnRequest(
                session=created.name,
                lease_id=lease.lease_id,
                etag=full.etag,
                state=b"z" * (EIGHT_MIB + 1),
            ),
            metadata=me,
        ),
    )
    state = await stub.GetSessionState(pb.GetSessionStateRequest(name=created.name), metadata=me)
    assert state.etag == full.etag and state.turn_count == 0


async def test_stop_and_delete(
    stub: sessions_pb2_grpc.SessionsServiceAsyncStub, settings: Settings, tenant: str
) -> None:
    me = who(tenant)
    sid = f"{tenant}-gone"
    name = (
        await stub.CreateSession(
            pb.CreateSessionRequest(session_id=sid, session=new_session()), metadata=me
        )
    ).name
    lease_key = f"{settings.redis_prefix}sessions:lease:{tenant}/{sid}"
    await stub.AcquireLease(pb.AcquireLeaseRequest(session=name, holder="e"), metadata=me)
    redis = create_redis(settings.require_redis())
    try:
        assert await redis.exists(lease_key) == 1
    finally:
        await redis.aclose()
    for _ in range(2):
        stopped = await stub.StopSession(pb.StopSessionRequest(name=name), metadata=me)
        assert stopped.status == pb.SESSION_STATUS_STOPPED
    err = await fails(
        grpc.StatusCode.FAILED_PRECONDITION,
        stub.AcquireLease(pb.AcquireLeaseRequest(session=name), metadata=me),
    )
    assert "stopped" in (err.details() or "")

    await fails(
        grpc.StatusCode.NOT_FOUND,
        stub.DeleteSession(pb.DeleteSessionRequest(name=name), metadata=who("x")),
    )
    await stub.DeleteSession(pb.DeleteSessionRequest(name=name), metadata=me)
    await fails(
        grpc.StatusCode.NOT_FOUND, stub.GetSession(pb.GetSessionRequest(name=name), metadata=me)
    )
    await fails(
        grpc.StatusCode.NOT_FOUND,
        stub.DeleteSession(pb.DeleteSessionRequest(name=name), metadata=me),
    )
    # The id is free again, and the new session starts clean (no stale cached record).
    again = await stub.CreateSession(
        pb.CreateSessionRequest(session_id=sid, session=new_session(n=2)), metadata=me
    )
    got = await stub.GetSession(pb.GetSessionRequest(name=name), metadata=me)
    assert (
        got.status == pb.SESSION_STATUS_ACTIVE
        and got.version == "agents/demo/versions/2"
        and got == again
    )
    redis = create_redis(settings.require_redis())
    try:
        assert await redis.exists(lease_key) == 0
    finally:
        await redis.aclose()


async def test_a_lease_passes_from_an_executor_that_no_longer_serves_the_session(
    services: Platform, stub: sessions_pb2_grpc.SessionsServiceAsyncStub,
    fleet: fleet_pb2_grpc.FleetServiceAsyncStub, tenant: str,
) -> None:
    me = who(tenant)
    name = (await stub.CreateSession(pb.CreateSessionRequest(session=new_session()), metadata=me)).name

    async def lease(holder: str) -> pb.Lease:
        return await stub.AcquireLease(pb.AcquireLeaseRequest(session=name, holder=holder), metadata=me)

    # exec-1 never heartbeated (or died): exec-2 takes its lease, and exec-1 can no longer commit.
    old = await lease("exec-1")
    taken = await lease("exec-2")
    err = await fails(grpc.StatusCode.ABORTED, stub.CommitTurn(pb.CommitTurnRequest(
        session=name, lease_id=old.lease_id, etag=old.state.etag, state=b"{}"), metadata=me))
    assert error_details(err)[0].reason == "LEASE_LOST"
    # exec-2, restarted under its name, gets it back at once.
    await fleet.Heartbeat(beat("exec-2"))
    again = await lease("exec-2")
    assert again.lease_id != taken.lease_id
    # A live, undrained holder keeps it; drained, it gives it up.
    await fleet.Heartbeat(beat("exec-3"))
    await fails(grpc.StatusCode.FAILED_PRECONDITION, lease("exec-3"))
    async with internal_channel(services.settings, "sessions", "router") as channel:
        admin = fleet_pb2_grpc.FleetServiceStub(channel)
        drained = await admin.DrainExecutor(
            fleet_pb2.DrainExecutorRequest(name="executors/exec-2"),
            metadata=platform_admin(services.settings))
        assert drained.draining
        await fleet.Heartbeat(beat("exec-2"))  # still alive, but drained
        assert (await lease("exec-3")).holder == "exec-3"
        # The session moved (PlaceSession, as the router does): exec-4 takes it from live exec-3.
        in_tenant = ((TENANT_KEY, tenant),)
        placed = await sessions_pb2_grpc.SessionsServiceStub(channel).PlaceSession(
            pb.PlaceSessionRequest(name=name, executor="executors/exec-4"), metadata=in_tenant)
        assert placed.executor == "executors/exec-4"
        await fleet.Heartbeat(beat("exec-4"))
        assert (await lease("exec-4")).holder == "exec-4"
        # A router whose view is older loses the compare-and-set, and is told where it is.
        err = await fails(grpc.StatusCode.ABORTED, sessions_pb2_grpc.SessionsServiceStub(
            channel).PlaceSession(pb.PlaceSessionRequest(
                name=name, executor="executors/exec-5", expected_executor="executors/exec-3"),
                metadata=in_tenant))
        info = error_details(err)[0]
        assert info.reason == "PLACEMENT_CONFLICT" and info.metadata["executor"] == "executors/exec-4"
