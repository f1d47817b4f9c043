"""Conversions between the sessions contract and the sessions domain: requests to parsed names
and domain values, records to messages."""

from __future__ import annotations

from typing import Protocol

from google.protobuf import duration_pb2
from google.protobuf.message import Message

from corral import names
from corral.names import AgentRef, EndpointRef, SessionRef, VersionRef
from corral.sessions.v1 import sessions_pb2 as pb
from services.common.errors import InvalidArgument
from services.common.fleet import EXECUTOR_PREFIX
from services.common.requests import REQUEST_DIGESTS, REQUEST_IDS
from services.common.timestamps import timestamp
from services.sessions import fleet_rules, model

_STATUS_TO_PB = {
    model.SessionStatus.ACTIVE: pb.SESSION_STATUS_ACTIVE,
    model.SessionStatus.STOPPED: pb.SESSION_STATUS_STOPPED,
    model.SessionStatus.EXPIRED: pb.SESSION_STATUS_EXPIRED,
}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}


class _Named(Protocol):
    """A request on one session that names it in `name` (the standard methods)."""

    name: str


class _OnSession(Protocol):
    """A request on one session's lease or turn, which names it in `session`."""

    session: str


def named(request: _Named) -> SessionRef:
    return SessionRef.parse(request.name, field="name")


def on_session(request: _OnSession) -> SessionRef:
    return SessionRef.parse(request.session, field="session")


def seconds(message: Message, field: str) -> float | None:
    """The duration in `field` of `message` in seconds; None when it is unset."""
    if not message.HasField(field):
        return None
    value: duration_pb2.Duration = getattr(message, field)
    return value.seconds + value.nanos / 1e9


def new_session(request: pb.CreateSessionRequest) -> tuple[SessionRef | None, model.NewSession]:
    """The session id a CreateSession asks for (None: generate one) and the session's pin."""
    s = request.session
    chosen = None
    if request.session_id:
        chosen = SessionRef(names.SESSION_IDS.check(request.session_id, field="session_id"))
    spec = model.NewSession(
        agent=AgentRef.parse(s.agent, field="session.agent"),
        pin=model.PinnedVersion(
            VersionRef.parse(s.version, field="session.version"),
            names.DIGESTS.check(s.version_digest, field="session.version_digest"),
        ),
        endpoint=EndpointRef.parse(s.endpoint, field="session.endpoint") if s.endpoint else None,
        idle_timeout_s=seconds(s, "idle_timeout"),
        max_lifetime_s=seconds(s, "max_lifetime"),
        executor=fleet_rules.executor_name(s.executor, "session.executor") if s.executor else "",
    )
    return chosen, spec


def session_filter(request: pb.ListSessionsRequest) -> model.SessionFilter:
    status: model.SessionStatus | None = None
    if request.status != pb.SESSION_STATUS_UNSPECIFIED:
        if request.status not in _STATUS_FROM_PB:
            raise InvalidArgument.field("status", f"{request.status} is not a model.SessionStatus")
        status = _STATUS_FROM_PB[request.status]
    return model.SessionFilter(
        agent=AgentRef.parse(request.agent, field="agent") if request.agent else None,
        version=VersionRef.parse(request.version, field="version") if request.version else None,
        status=status,
    )


def retirement(
    request: pb.RetireVersionRequest,
) -> tuple[VersionRef, EndpointRef | None, model.PinnedVersion | None]:
    """What a RetireVersion retires (the version, through which endpoint or any), and where its
    sessions go (None: they stop)."""
    if request.action == pb.RETIRE_ACTION_UNSPECIFIED:
        raise InvalidArgument.field("action", "must be MIGRATE or STOP")
    version = VersionRef.parse(request.version, field="version")
    endpoint = EndpointRef.parse(request.endpoint, field="endpoint") if request.endpoint else None
    if request.action != pb.RETIRE_ACTION_MIGRATE:
        return version, endpoint, None
    to = model.PinnedVersion(
        VersionRef.parse(request.to_version, field="to_version"),
        names.DIGESTS.check(request.to_version_digest, field="to_version_digest"),
    )
    return version, endpoint, to


def pinned_versions(request: pb.CountPinnedSessionsRequest) -> list[VersionRef]:
    return [VersionRef.parse(v, field=f"versions[{i}]") for i, v in enumerate(request.versions)]


def pinned_pb(pins: model.PinnedSessions) -> pb.PinnedSessions:
    message = pb.PinnedSessions(version=pins.version, active_sessions=pins.active)
    if pins.last_active_time is not None:
        message.last_active_time.CopyFrom(timestamp(pins.last_active_time))
    return message


def session_pb(record: model.SessionRecord) -> pb.Session:
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
        executor=f"{EXECUTOR_PREFIX}{record.executor}" if record.executor else "",
    )


def state_pb(state: model.SessionState) -> pb.SessionState:
    return pb.SessionState(
        session=names.session_name(state.session_id),
        state=state.state,
        etag=state.etag,
        turn_count=state.turn_count,
    )


def lease_pb(lease: model.SessionLease) -> pb.Lease:
    message = pb.Lease(
        session=names.session_name(lease.session_id),
        lease_id=lease.lease_id,
        holder=lease.holder,
        expire_time=timestamp(lease.expire_time),
    )
    if lease.state is not None:
        message.state.CopyFrom(state_pb(lease.state))
    return message


def turn(request: pb.CommitTurnRequest) -> model.Turn:
    return model.Turn(
        invocation_id=request.invocation_id, input=request.input, output=request.output,
        request=turn_request(request),
    )


def turn_request(request: pb.CommitTurnRequest) -> model.TurnRequest | None:
    """The request id a turn ran under, with the digest a retry must match; None without one."""
    if not request.request_id:
        return None
    return model.TurnRequest(
        request_id=REQUEST_IDS.check(request.request_id, field="request_id"),
        digest=REQUEST_DIGESTS.check(request.request_digest, field="request_digest"),
        content_type=request.content_type, trace_id=request.trace_id,
    )


def result_lookup(request: pb.LookupTurnResultRequest) -> tuple[SessionRef, str, str]:
    return (
        on_session(request),
        REQUEST_IDS.check(request.request_id, field="request_id"),
        REQUEST_DIGESTS.check(request.request_digest, field="request_digest"),
    )


def result_pb(result: model.TurnResult | None) -> pb.LookupTurnResultResponse:
    if result is None:
        return pb.LookupTurnResultResponse()
    return pb.LookupTurnResultResponse(result=pb.TurnResult(
        turn=result.turn, output=result.output, content_type=result.content_type,
        version=result.version, invocation_id=result.invocation_id, trace_id=result.trace_id,
        commit_time=timestamp(result.commit_time),
    ))


def placement(request: pb.PlaceSessionRequest) -> tuple[SessionRef, str, str]:
    """The session, the executor it goes to, and the one the caller saw ("" for none)."""
    expected = request.expected_executor
    return (
        named(request),
        fleet_rules.executor_name(request.executor, "executor"),
        fleet_rules.executor_name(expected, "expected_executor") if expected else "",
    )
