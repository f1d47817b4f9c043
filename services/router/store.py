"""The router's calls to other services: sessions (pins), registry (versions), executor."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator

import grpc

from corral import names
from corral.executor.v1 import executor_pb2, executor_pb2_grpc
from corral.registry.v1 import registry_pb2, registry_pb2_grpc
from corral.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from services.common.clients import call_metadata, channel
from services.common.identity import Caller
from services.common.settings import Settings


class Clients:
    def __init__(self, settings: Settings) -> None:
        self._channels = {svc: channel(settings, svc) for svc in ("registry", "sessions", "executor")}
        self.registry = registry_pb2_grpc.RegistryServiceStub(self._channels["registry"])
        self.sessions = sessions_pb2_grpc.SessionsServiceStub(self._channels["sessions"])
        self.executor = executor_pb2_grpc.ExecutorServiceStub(self._channels["executor"])
        # Versions are immutable: once looked up, they never change.
        self._versions: dict[str, registry_pb2.Version] = {}

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()

    async def version(self, name: str) -> registry_pb2.Version:
        version = self._versions.get(name)
        if version is None:
            version = await self.registry.GetVersion(registry_pb2.GetVersionRequest(name=name))
            self._versions[name] = version
        return version

    async def version_digest(self, version: str) -> str:
        return (await self.version(version)).digest

    async def get_session(self, caller: Caller, session: str) -> sessions_pb2.Session | None:
        try:
            return await self.sessions.GetSession(
                sessions_pb2.GetSessionRequest(name=session), metadata=call_metadata(caller)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def create_session(
        self, caller: Caller, session_id: str, agent: str, version: str, digest: str, endpoint: str
    ) -> sessions_pb2.Session | None:
        """Creates the session with its pin; None if it already exists (a race, or a session the
        router has not seen yet)."""
        session = sessions_pb2.Session(
            agent=names.agent_name(agent), version=version, version_digest=digest, endpoint=endpoint,
        )
        # The session's lifecycle is the version's, from its manifest's [lifecycle].
        manifest = (await self.version(version)).manifest
        if manifest.idle_timeout_s:
            session.idle_timeout.FromSeconds(manifest.idle_timeout_s)
        if manifest.max_lifetime_s:
            session.max_lifetime.FromSeconds(manifest.max_lifetime_s)
        try:
            return await self.sessions.CreateSession(
                sessions_pb2.CreateSessionRequest(session_id=session_id, session=session),
                metadata=call_metadata(caller),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                return None
            raise

    async def stop_session(self, caller: Caller, session: str) -> None:
        await self.sessions.StopSession(
            sessions_pb2.StopSessionRequest(name=session), metadata=call_metadata(caller)
        )
        await self.executor.StopSession(
            executor_pb2.StopSessionRequest(session=session), metadata=call_metadata(caller)
        )

    def execute(
        self, caller: Caller, request: executor_pb2.ExecuteRequest, metadata: tuple[tuple[str, str], ...]
    ) -> AsyncIterator[executor_pb2.ExecuteResponse]:
        return self.executor.Execute(request, metadata=(*caller.metadata(), *metadata))  # type: ignore[no-any-return]


class PinCache:
    """Session pins seen by this router. A pin never changes, so a cached one is always right."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._pins: OrderedDict[str, sessions_pb2.Session] = OrderedDict()

    def get(self, session: str) -> sessions_pb2.Session | None:
        pin = self._pins.get(session)
        if pin is not None:
            self._pins.move_to_end(session)
        return pin

    def put(self, session: sessions_pb2.Session) -> None:
        self._pins[session.name] = session
        self._pins.move_to_end(session.name)
        while len(self._pins) > self.capacity:
            self._pins.popitem(last=False)

    def forget(self, session: str) -> None:
        self._pins.pop(session, None)
