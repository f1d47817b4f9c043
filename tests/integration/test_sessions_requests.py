"""Request ids in the sessions service, as the executor uses them: a turn committed under one is
recorded with its result in the same commit, found again by LookupTurnResult, never committed
twice, refused for another request, and forgotten after the retention time. Real grpc.aio server,
PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from corral.names import SessionRef
from corral.sessions.v1 import sessions_pb2 as pb
from services.common import db
from services.common.auth.principal import Role
from services.common.identity import Caller
from services.common.kv import KeySpace, create_redis
from services.common.requests import request_digest
from services.common.settings import Settings
from services.sessions.requests import TurnResults
from services.sessions.requests_store import PgTurnResults
from services.sessions.store import PgSessionStore, RecordCache
from tests.fakes.common import FakeClock
from tests.harness import Platform
from tests.integration import test_sessions_tenancy
from tests.integration.test_sessions import new_session
from tests.integration.test_sessions_tenancy import Stub
from tests.rpc import Metadata, error_details, fails, new_tenant, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
# The sessions service as the executor sees it.
stub = test_sessions_tenancy.stub

async def leased_session(stub: Stub, me: Metadata) -> tuple[str, pb.Lease]:
    created = await stub.CreateSession(pb.CreateSessionRequest(session=new_session()), metadata=me)
    name = created.name
    lease = await stub.AcquireLease(pb.AcquireLeaseRequest(session=name, holder="exec"), metadata=me)
    return name, lease


async def test_a_turn_committed_under_a_request_id_is_found_and_not_committed_twice(
    stub: Stub,
) -> None:
    me = who(new_tenant())
    name, lease = await leased_session(stub, me)
    digest = request_digest(b'{"q": 1}', "application/json")

    def commit(etag: str, request_id: str, output: bytes) -> Awaitable[pb.SessionState]:
        return stub.CommitTurn(pb.CommitTurnRequest(
            session=name, lease_id=lease.lease_id, etag=etag, state=b'{"turns": 1}',
            invocation_id="inv-1", input=b'{"q": 1}', output=output, request_id=request_id,
            request_digest=digest, content_type="application/json", trace_id="ab" * 16,
        ), metadata=me)

    def lookup(request_id: str, digest: str = digest) -> Awaitable[pb.LookupTurnResultResponse]:
        return stub.LookupTurnResult(pb.LookupTurnResultRequest(
            session=name, request_id=request_id, request_digest=digest), metadata=me)

    assert not (await lookup("r-1")).HasField("result")
    saved = await commit(lease.state.etag, "r-1", b"Turn 1.")
    found = (await lookup("r-1")).result
    assert (found.turn, found.output, found.content_type) == (1, b"Turn 1.", "application/json")
    assert (found.version, found.invocation_id, found.trace_id) == (
        "agents/demo/versions/1", "inv-1", "ab" * 16)
    assert found.commit_time.ToDatetime(UTC) > datetime.now(UTC) - timedelta(minutes=5)

    # The same request id cannot commit another turn: nothing changes, the caller is told why.
    err = await fails(grpc.StatusCode.ABORTED, commit(saved.etag, "r-1", b"Turn 2."))
    assert error_details(err)[0].reason == "REQUEST_ALREADY_COMMITTED"
    state = await stub.GetSessionState(pb.GetSessionStateRequest(name=name), metadata=me)
    assert (state.turn_count, state.etag) == (1, saved.etag)

    # Another request under the id is refused, never answered with this one's result.
    err = await fails(
        grpc.StatusCode.FAILED_PRECONDITION,
        lookup("r-1", request_digest(b'{"q": 2}', "application/json")),
    )
    assert error_details(err)[0].reason == "REQUEST_ID_REUSED"
    # Another session's, or another tenant's, request ids are theirs.
    other, _ = await leased_session(stub, me)
    missing = await stub.LookupTurnResult(pb.LookupTurnResultRequest(
        session=other, request_id="r-1", request_digest=digest), metadata=me)
    assert not missing.HasField("result")
    await fails(grpc.StatusCode.NOT_FOUND, stub.LookupTurnResult(pb.LookupTurnResultRequest(
        session=name, request_id="r-1", request_digest=digest), metadata=who(new_tenant())))


async def test_malformed_request_ids_and_digests_are_refused(stub: Stub) -> None:
    me = who(new_tenant())
    name, lease = await leased_session(stub, me)
    for request_id, digest, field in (
        ("has space", request_digest(b"", ""), "request_id"), ("ok", "md5:1", "request_digest"), ("ok", "", "request_digest"),
    ):
        err = await fails(grpc.StatusCode.INVALID_ARGUMENT, stub.CommitTurn(pb.CommitTurnRequest(
            session=name, lease_id=lease.lease_id, etag=lease.state.etag, request_id=request_id,
            request_digest=digest), metadata=me))
        assert error_details(err)[1] == [field]
        err = await fails(grpc.StatusCode.INVALID_ARGUMENT, stub.LookupTurnResult(
            pb.LookupTurnResultRequest(session=name, request_id=request_id, request_digest=digest),
            metadata=me))
        assert error_details(err)[1] == [field]
    state = await stub.GetSessionState(pb.GetSessionStateRequest(name=name), metadata=me)
    assert state.turn_count == 0


async def test_results_are_forgotten_after_the_retention_time(
    stub: Stub, services: Platform, settings: Settings
) -> None:
    tenant = new_tenant()
    me = who(tenant)
    name, lease = await leased_session(stub, me)
    digest = request_digest(b"{}", "application/json")
    await stub.CommitTurn(pb.CommitTurnRequest(
        session=name, lease_id=lease.lease_id, etag=lease.state.etag, output=b"Turn 1.",
        request_id="kept", request_digest=digest), metadata=me)

    pool = await db.create_pool(settings.require_database())
    client = create_redis(settings.require_redis())
    try:
        clock = FakeClock(datetime.now(UTC))
        store = PgSessionStore(pool, RecordCache(client, KeySpace(settings.redis_prefix)))
        results = TurnResults(PgTurnResults(pool), store, retention_s=3600, clock=clock)
        caller = Caller(tenant, "alice", frozenset({Role.ADMIN}))  # as who(tenant) is
        session = SessionRef.parse(name)
        await results.sweep()
        assert await results.lookup(caller, session, "kept", digest) is not None
        clock.advance(3601)
        # Past the retention time it answers no retry, even before the sweep deletes it...
        assert await results.lookup(caller, session, "kept", digest) is None
        await results.sweep()
        # ...and the sweep deleted it.
        left = await pool.fetchval(
            "SELECT count(*) FROM sessions.turn_requests WHERE tenant = $1", tenant)
        assert left == 0
    finally:
        await client.aclose()
        await pool.close()
