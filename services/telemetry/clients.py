"""Telemetry's one call out: the sessions service, asked whether a session exists when a score
names a session whose spans have not arrived yet."""

from __future__ import annotations

from corral.names import SessionRef
from corral.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from services.common.auth.principal import Principal
from services.common.clients import ServiceClient
from services.common.errors import NotFound
from services.common.settings import Settings
from services.common.status import calling
from services.telemetry.model import RecordedSession

TIMEOUT_S = 10


class SessionsClient(ServiceClient["sessions_pb2_grpc.SessionsServiceAsyncStub"]):
    """Implements SessionDirectory: asks as telemetry acting in the tenant, so the answer is
    that tenant's session or none (whose it is, the caller's rights, telemetry checks)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "sessions", sessions_pb2_grpc.SessionsServiceStub)

    async def find_session(self, tenant: str, session: SessionRef) -> RecordedSession | None:
        acting = self.metadata(Principal.of_service("telemetry", tenant))
        try:
            with calling("sessions"):
                found = await self._stub.GetSession(
                    sessions_pb2.GetSessionRequest(name=session.name), metadata=acting,
                    timeout=TIMEOUT_S)
        except NotFound:
            return None
        return RecordedSession(found.tenant, found.user, found.agent, found.version, found.endpoint)
