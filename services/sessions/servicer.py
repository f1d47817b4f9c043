"""SessionsService over gRPC: converts requests to domain calls and domain values to protos."""

from __future__ import annotations

from typing import Protocol

from google.protobuf import duration_pb2
from google.protobuf.message import Message

from corral import names
from corral.names import AgentRef, EndpointRef, SessionRef, VersionRef
from corral.sessions.v1 import sessions_pb2 as pb
from corral.sessions.v1 import sessions_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.identity import caller
from services.common.interceptors import Context
from services.common.timestamps import timestamp
from services.sessions.model import (
    NewSession,
    PinnedVersion,
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


class _Named(Protocol):
    """A request on one session that names it in `name` (the standard methods)."""

    name: str


class _OnSession(Protocol):
    """A request on one session's lease or turn, which names it in `session`."""

    session: str


def _named(request: _Named) -> SessionRef:
    return SessionRef.parse(request.name, field="name")


def _on_session(request: _OnSession) -> SessionRef:
    return SessionRef.parse(request.session, field="session")


def _seconds(message: Message, field: str) -> float | None:
    """The duration in `field` of `message` in seconds; None when it is unset."""
    if not message.HasField(field):
        return None
    value: duration_pb2.Duration = getattr(message, field)
    return value.seconds + value.nanos / 1e9


def new_session(request: pb.CreateSessionRequest) -> tuple[SessionRef | None, NewSession]:
    """The session id a CreateSession asks for (None: generate one) and the session's pin."""
    s = request.session
    chosen = None
    if request.session_id:
        chosen = SessionRef(names.SESSION_IDS.check(request.session_id, field="session_id"))
    spec = NewSession(
        agent=AgentRef.parse(s.agent, field="session.agent"),
        pin=PinnedVersion(
            VersionRef.parse(s.version, field="session.version"),
            names.DIGESTS.check(s.version_digest, field="session.version_digest"),
        ),
        endpoint=EndpointRef.parse(s.endpoint, field="session.endpoint") if s.endpoint else None,
        idle_timeout_s=_seconds(s, "idle_timeout"),
        max_lifetime_s=_seconds(s, "max_lifetime"),
    )
    return chosen, spec


def session_filter(request: pb.ListSessionsRequest) -> SessionFilter:
    status: SessionStatus | None = None
    if request.status != pb.SESSION_STATUS_UNSPECIFIED:
        if request.status not in _STATUS_FROM_PB:
            raise InvalidArgument.field("status", f"{request.status} is not a SessionStatus")
        status = _STATUS_FROM_PB[request.status]
    return SessionFilter(
        agent=AgentRef.parse(request.agent, field="agent") if request.agent else None,
        version=VersionRef.parse(request.version, field="version") if request.version else None,
        status=status,
    )


def retirement(
    request: pb.RetireVersionRequest,
) -> tuple[VersionRef, EndpointRef | None, PinnedVersion | None]:
    """What a RetireVersion retires (the version, through which endpoint or any), and where its
    sessions go (None: they stop)."""
    if request.action == pb.RETIRE_ACTION_UNSPECIFIED:
        raise InvalidArgument.field("action", "must be MIGRATE or STOP")
    version = VersionRef.parse(request.version, field="version")
    endpoint = EndpointRef.parse(request.endpoint, field="endpoint") if request.endpoint else None
    if request.action != pb.RETIRE_ACTION_MIGRATE:
        return version, endpoint, None
    to = PinnedVersion(
        VersionRef.parse(request.to_version, field="to_version"),
        names.DIGESTS.check(request.to_version_digest, field="to_version_digest"),
    )
    return version, endpoint, to


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

    async def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.Session:
        session, spec = new_session(request)
        return session_pb(await self._sessions.create(caller(context), session, spec))

    async def GetSession(self, request: pb.GetSessionRequest, context: Context) -> pb.Session:
        return session_pb(await self._sessions.get(caller(context), _named(request)))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        page = await self._sessions.list(
            caller(context), session_filter(request), request.page_size, request.page_token
        )
        return pb.ListSessionsResponse(
            sessions=[session_pb(r) for r in page.items], next_page_token=page.next_page_token
        )

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Context
    ) -> pb.DeleteSessionResponse:
        await self._sessions.delete(caller(context), _named(request))
        return pb.DeleteSessionResponse()

    async def StopSession(self, request: pb.StopSessionRequest, context: Context) -> pb.Session:
        return session_pb(await self._sessions.stop(caller(context), _named(request)))

    async def GetSessionState(
        self, request: pb.GetSessionStateRequest, context: Context
    ) -> pb.SessionState:
        return state_pb(await self._sessions.get_state(caller(context), _named(request)))

    async def UpdateSessionState(
        self, request: pb.UpdateSessionStateRequest, context: Context
    ) -> pb.SessionState:
        return state_pb(await self._sessions.update_state(
            caller(context), _named(request), request.state, request.etag
        ))

    async def AcquireLease(self, request: pb.AcquireLeaseRequest, context: Context) -> pb.Lease:
        lease = await self._sessions.acquire_lease(
            caller(context), _on_session(request), request.holder, _seconds(request, "ttl")
        )
        return lease_pb(lease)

    async def RenewLease(self, request: pb.RenewLeaseRequest, context: Context) -> pb.Lease:
        lease = await self._sessions.renew_lease(
            caller(context), _on_session(request), request.lease_id, _seconds(request, "ttl")
        )
        return lease_pb(lease)

    async def ReleaseLease(
        self, request: pb.ReleaseLeaseRequest, context: Context
    ) -> pb.ReleaseLeaseResponse:
        await self._sessions.release_lease(caller(context), _on_session(request), request.lease_id)
        return pb.ReleaseLeaseResponse()

    async def CommitTurn(self, request: pb.CommitTurnRequest, context: Context) -> pb.SessionState:
        session = _on_session(request)
        turn = Turn(invocation_id=request.invocation_id, input=request.input, output=request.output)
        state = await self._sessions.commit_turn(
            caller(context), session, request.lease_id, request.etag, request.state, turn
        )
        return state_pb(state)

    async def RetireVersion(
        self, request: pb.RetireVersionRequest, context: Context
    ) -> pb.RetireVersionResponse:
        version, endpoint, to = retirement(request)
        count = await self._sessions.retire_version(caller(context), version, endpoint, to)
        return pb.RetireVersionResponse(sessions=count)
