"""SessionsService over gRPC: converts requests to domain calls and domain values to protos
(the conversions are in messages.py)."""

from __future__ import annotations

from corral.sessions.v1 import sessions_pb2 as pb
from corral.sessions.v1 import sessions_pb2_grpc
from services.common import identity
from services.common.identity import caller
from services.common.interceptors import Context
from services.sessions import messages
from services.sessions.requests import TurnResults
from services.sessions.sessions import Sessions


class SessionsServicer(sessions_pb2_grpc.SessionsServiceServicer):
    def __init__(self, sessions: Sessions, results: TurnResults) -> None:
        self._sessions = sessions
        self._results = results

    async def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.Session:
        session, spec = messages.new_session(request)
        # A user's own pin is checked with the registry; the router's was resolved in the tenant.
        created = await self._sessions.create(
            caller(context), session, spec, verify_pin=not identity.relayed()
        )
        return messages.session_pb(created)

    async def GetSession(self, request: pb.GetSessionRequest, context: Context) -> pb.Session:
        return messages.session_pb(await self._sessions.get(caller(context), messages.named(request)))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        page = await self._sessions.list(
            caller(context), messages.session_filter(request), request.page_size, request.page_token
        )
        return pb.ListSessionsResponse(
            sessions=[messages.session_pb(r) for r in page.items], next_page_token=page.next_page_token
        )

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Context
    ) -> pb.DeleteSessionResponse:
        await self._sessions.delete(caller(context), messages.named(request))
        return pb.DeleteSessionResponse()

    async def StopSession(self, request: pb.StopSessionRequest, context: Context) -> pb.Session:
        return messages.session_pb(await self._sessions.stop(caller(context), messages.named(request)))

    async def GetSessionState(
        self, request: pb.GetSessionStateRequest, context: Context
    ) -> pb.SessionState:
        return messages.state_pb(await self._sessions.get_state(caller(context), messages.named(request)))

    async def UpdateSessionState(
        self, request: pb.UpdateSessionStateRequest, context: Context
    ) -> pb.SessionState:
        return messages.state_pb(await self._sessions.update_state(
            caller(context), messages.named(request), request.state, request.etag
        ))

    async def AcquireLease(self, request: pb.AcquireLeaseRequest, context: Context) -> pb.Lease:
        lease = await self._sessions.acquire_lease(
            caller(context), messages.on_session(request), request.holder, messages.seconds(request, "ttl")
        )
        return messages.lease_pb(lease)

    async def RenewLease(self, request: pb.RenewLeaseRequest, context: Context) -> pb.Lease:
        lease = await self._sessions.renew_lease(
            caller(context), messages.on_session(request), request.lease_id, messages.seconds(request, "ttl")
        )
        return messages.lease_pb(lease)

    async def ReleaseLease(
        self, request: pb.ReleaseLeaseRequest, context: Context
    ) -> pb.ReleaseLeaseResponse:
        await self._sessions.release_lease(caller(context), messages.on_session(request), request.lease_id)
        return pb.ReleaseLeaseResponse()

    async def CommitTurn(self, request: pb.CommitTurnRequest, context: Context) -> pb.SessionState:
        session = messages.on_session(request)
        state = await self._sessions.commit_turn(
            caller(context), session, request.lease_id, request.etag, request.state, messages.turn(request)
        )
        return messages.state_pb(state)

    async def LookupTurnResult(
        self, request: pb.LookupTurnResultRequest, context: Context
    ) -> pb.LookupTurnResultResponse:
        session, request_id, digest = messages.result_lookup(request)
        return messages.result_pb(
            await self._results.lookup(caller(context), session, request_id, digest)
        )

    async def RetireVersion(
        self, request: pb.RetireVersionRequest, context: Context
    ) -> pb.RetireVersionResponse:
        version, endpoint, to = messages.retirement(request)
        count = await self._sessions.retire_version(caller(context), version, endpoint, to)
        return pb.RetireVersionResponse(sessions=count)

    async def CountPinnedSessions(
        self, request: pb.CountPinnedSessionsRequest, context: Context
    ) -> pb.CountPinnedSessionsResponse:
        pins = await self._sessions.count_pinned(caller(context), messages.pinned_versions(request))
        return pb.CountPinnedSessionsResponse(pins=[messages.pinned_pb(p) for p in pins])

    async def PlaceSession(self, request: pb.PlaceSessionRequest, context: Context) -> pb.Session:
        session, executor, expected = messages.placement(request)
        placed = await self._sessions.place(caller(context), session, executor, expected)
        return messages.session_pb(placed)
