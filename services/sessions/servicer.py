"""SessionsService over gRPC: converts requests to domain calls and domain values to protos."""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2

from corral import names
from corral.sessions.v1 import sessions_pb2 as pb
from corral.sessions.v1 import sessions_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.identity import caller
from services.common.timestamps import timestamp
from services.sessions.model import (
    NewSession,
    SessionFilter,
    SessionLease,
    SessionRecord,
    SessionState,
    SessionStatus,
    Turn,
)
from services.sessions.sessions import Sessions

_STATUS_TO_PB = {
    SessionStatus.ACTIVE: pb.SESSION_STATUS_ACTIVE,
    SessionStatus.STOPPED: pb.SESSION_STATUS_STOPPED,
    SessionStatus.EXPIRED: pb.SESSION_STATUS_EXPIRED,
}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}


def _seconds(value: duration_pb2.Duration) -> float:
    return value.seconds + value.nanos / 1e9


def session_pb(record: SessionRecord) -> pb.Session:
    return pb.Session(
        name=record.name,
        agent=record.agent,
        version=record.version,
        version_digest=record.version_digest,
        endpoint=record.endpoint,
        tenant=record.tenant,
        user=record.user,
        status=_STATUS_TO_PB[record.status],
        turn_count=record.turn_count,
        create_time=timestamp(record.create_time),
        update_time=timestamp(record.update_time),
        last_active_time=timestamp(record.last_active_time),
        idle_timeout=duration_pb2.Duration(seconds=record.idle_timeout_s),
        max_lifetime=duration_pb2.Duration(seconds=record.max_lifetime_s),
        state_etag=record.state_etag,
    )


def state_pb(state: SessionState) -> pb.SessionState:
    return pb.SessionState(
        session=names.session_name(state.session_id),
        state=state.state,
        etag=state.etag,
        turn_count=state.turn_count,
    )


def lease_pb(lease: SessionLease) -> pb.Lease:
    message = pb.Lease(
        session=names.session_name(lease.session_id),
        lease_id=lease.lease_id,
        holder=lease.holder,
        expire_time=timestamp(lease.expire_time),
    )
    if lease.state is not None:
        message.state.CopyFrom(state_pb(lease.state))
    return message


class SessionsServicer(sessions_pb2_grpc.SessionsServiceServicer):
    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Session:
        s = request.session
        spec = NewSession(
            agent=s.agent,
            version=s.version,
            version_digest=s.version_digest,
            endpoint=s.endpoint,
            idle_timeout_s=_seconds(s.idle_timeout) if s.HasField("idle_timeout") else None,
            max_lifetime_s=_seconds(s.max_lifetime) if s.HasField("max_lifetime") else None,
        )
        record = await self._sessions.create(caller(context), request.session_id, spec)
        return session_pb(record)

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Session:
        return session_pb(await self._sessions.get(caller(context), request.name))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        status: SessionStatus | None = None
        if request.status != pb.SESSION_STATUS_UNSPECIFIED:
            if request.status not in _STATUS_FROM_PB:
                raise InvalidArgument.field("status", f"{request.status} is not a SessionStatus")
            status = _STATUS_FROM_PB[request.status]
        where = SessionFilter(agent=request.agent, version=request.version, status=status)
        page = await self._sessions.list(
            caller(context), where, request.page_size, request.page_token
        )
        return pb.ListSessionsResponse(
            sessions=[session_pb(r) for r in page.sessions], next_page_token=page.next_page_token
        )

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteSessionResponse:
        await self._sessions.delete(caller(context), request.name)
        return pb.DeleteSessionResponse()

    async def StopSession(
        self, request: pb.StopSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Session:
        return session_pb(await self._sessions.stop(caller(context), request.name))

    async def GetSessionState(
        self, request: pb.GetSessionStateRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionState:
        return state_pb(await self._sessions.get_state(caller(context), request.name))

    async def UpdateSessionState(
        self, request: pb.UpdateSessionStateRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionState:
        state = await self._sessions.update_state(
            caller(context), request.name, request.state, request.etag
        )
        return state_pb(state)

    async def AcquireLease(
        self, request: pb.AcquireLeaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.Lease:
        ttl = _seconds(request.ttl) if request.HasField("ttl") else None
        lease = await self._sessions.acquire_lease(
            caller(context), request.session, request.holder, ttl
        )
        return lease_pb(lease)

    async def RenewLease(
        self, request: pb.RenewLeaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.Lease:
        ttl = _seconds(request.ttl) if request.HasField("ttl") else None
        lease = await self._sessions.renew_lease(
            caller(context), request.session, request.lease_id, ttl
        )
        return lease_pb(lease)

    async def ReleaseLease(
        self, request: pb.ReleaseLeaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseLeaseResponse:
        await self._sessions.release_lease(caller(context), request.session, request.lease_id)
        return pb.ReleaseLeaseResponse()

    async def CommitTurn(
        self, request: pb.CommitTurnRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionState:
        turn = Turn(invocation_id=request.invocation_id, input=request.input, output=request.output)
        state = await self._sessions.commit_turn(
            caller(context), request.session, request.lease_id, request.etag, request.state, turn
        )
        return state_pb(state)

    async def RetireVersion(
        self, request: pb.RetireVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.RetireVersionResponse:
        if request.action == pb.RETIRE_ACTION_MIGRATE and not request.to_version:
            raise InvalidArgument.field("to_version", "is required to migrate sessions")
        if request.action == pb.RETIRE_ACTION_UNSPECIFIED:
            raise InvalidArgument.field("action", "must be MIGRATE or STOP")
        to_version = request.to_version if request.action == pb.RETIRE_ACTION_MIGRATE else ""
        count = await self._sessions.retire_version(
            caller(context), request.version, request.endpoint, to_version, request.to_version_digest
        )
        return pb.RetireVersionResponse(sessions=count)
