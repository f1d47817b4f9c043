"""The router's calls out, over gRPC, as the Protocols of model.py: sessions (pins, placements),
the registry (versions), the fleet (its members) and the executors (each at its address). They return domain values and raise the domain error tree."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass

import grpc

from corral.executor.v1 import executor_pb2, executor_pb2_grpc
from corral.names import AgentRef, EndpointRef, ResourceNameError, SessionRef, VersionRef
from corral.registry.v1 import registry_pb2, registry_pb2_grpc
from corral.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from services.common import tracing
from services.common.auth.principal import Principal
from services.common.clients import ChannelPool, ServiceClient, on_behalf_of
from services.common.endpoint_watch import RegistryEndpoints
from services.common.endpoints import EndpointSource, EndpointUpdate
from services.common.errors import AlreadyExists, CorralError, Internal, NotFound, Unavailable
from services.common.execution import Completed, Started
from services.common.fleet import EXECUTOR_PREFIX, FleetMember
from services.common.fleet_client import FleetClient
from services.common.identity import Caller
from services.common.settings import Settings
from services.common.status import calling, error_info, from_rpc_error
from services.common.tenancy import SessionOwner
from services.router.model import (
    REASON_EXECUTOR_UNAVAILABLE,
    Chunk,
    ExecutionEvent,
    Invocation,
    SessionEnd,
    SessionPin,
    TraceContext,
    VersionInfo,
)

_ENDED = {
    sessions_pb2.SESSION_STATUS_ACTIVE: None,
    sessions_pb2.SESSION_STATUS_STOPPED: SessionEnd.STOPPED,
    sessions_pb2.SESSION_STATUS_EXPIRED: SessionEnd.EXPIRED,
}

# How the router names itself to the registry.
ROUTER = "router"


def _pin(session: sessions_pb2.Session) -> SessionPin:
    try:
        return SessionPin(
            session=SessionRef.parse(session.name),
            owner=SessionOwner(session.tenant, session.user),
            ended=_ENDED[session.status],
            agent=AgentRef.parse(session.agent),
            version=VersionRef.parse(session.version),
            digest=session.version_digest,
            endpoint=EndpointRef.parse(session.endpoint) if session.endpoint else None,
            executor=session.executor.removeprefix(EXECUTOR_PREFIX),
        )
    except (ResourceNameError, KeyError) as exc:
        raise Internal(f"sessions answered with a session the router cannot read ({exc})") from None


async def _pin_unless(
    absent: type[CorralError], call: Awaitable[sessions_pb2.Session]
) -> SessionPin | None:
    """The session a call to sessions answers with, or None when it fails with `absent`."""
    try:
        with calling("sessions"):
            return _pin(await call)
    except absent:
        return None


class SessionsService(ServiceClient["sessions_pb2_grpc.SessionsServiceAsyncStub"]):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "sessions", sessions_pb2_grpc.SessionsServiceStub)

    async def get(self, caller: Caller, session: SessionRef) -> SessionPin | None:
        request = sessions_pb2.GetSessionRequest(name=session.name)
        found = self._stub.GetSession(request, metadata=self.metadata(caller))
        return await _pin_unless(NotFound, found)

    async def create(
        self, caller: Caller, session: SessionRef, version: VersionInfo,
        endpoint: EndpointRef | None, executor: str,
    ) -> SessionPin | None:
        pinned = sessions_pb2.Session(
            agent=version.ref.parent.name,
            version=version.ref.name,
            version_digest=version.digest,
            endpoint=endpoint.name if endpoint is not None else "",
            executor=f"{EXECUTOR_PREFIX}{executor}",
        )
        if version.idle_timeout_s:
            pinned.idle_timeout.FromSeconds(version.idle_timeout_s)
        if version.max_lifetime_s:
            pinned.max_lifetime.FromSeconds(version.max_lifetime_s)
        request = sessions_pb2.CreateSessionRequest(session_id=session.session, session=pinned)
        created = self._stub.CreateSession(request, metadata=self.metadata(caller))
        return await _pin_unless(AlreadyExists, created)

    async def place(
        self, tenant: str, session: SessionRef, executor: str, expected: str
    ) -> SessionPin:
        # As the router itself, in the session's tenant: moving a session is no user's act.
        request = sessions_pb2.PlaceSessionRequest(
            name=session.name, executor=f"{EXECUTOR_PREFIX}{executor}",
            expected_executor=f"{EXECUTOR_PREFIX}{expected}" if expected else "",
        )
        acting = self.metadata(Principal.of_service(ROUTER, tenant))
        with calling("sessions"):
            return _pin(await self._stub.PlaceSession(request, metadata=acting))

    async def stop(self, caller: Caller, session: SessionRef) -> None:
        with calling("sessions"):
            await self._stub.StopSession(
                sessions_pb2.StopSessionRequest(name=session.name), metadata=self.metadata(caller)
            )

    async def delete(self, caller: Caller, session: SessionRef) -> None:
        with calling("sessions"):
            await self._stub.DeleteSession(
                sessions_pb2.DeleteSessionRequest(name=session.name), metadata=self.metadata(caller)
            )


class RegistryVersions(ServiceClient["registry_pb2_grpc.RegistryServiceAsyncStub"]):
    """Versions never change once published and checked: each is asked for once (again while
    its start check runs)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "registry", registry_pb2_grpc.RegistryServiceStub)
        self._versions: dict[tuple[str, VersionRef], VersionInfo] = {}

    async def version(self, tenant: str, ref: VersionRef) -> VersionInfo:
        known = self._versions.get((tenant, ref))
        if known is not None:
            return known
        acting = self.metadata(Principal.of_service(ROUTER, tenant))
        with calling("registry"):
            found = await self._stub.GetVersion(
                registry_pb2.GetVersionRequest(name=ref.name), metadata=acting)
        manifest = found.manifest
        # UNSPECIFIED: a registry from before the start check, whose versions all serve.
        ready = found.state in (registry_pb2.Version.STATE_READY, registry_pb2.Version.STATE_UNSPECIFIED)
        info = VersionInfo(ref, found.digest, manifest.idle_timeout_s, manifest.max_lifetime_s, ready)
        if found.state != registry_pb2.Version.STATE_CHECKING:  # its state is final
            self._versions[(tenant, ref)] = info
        return info

    async def forget_removed(self, update: EndpointUpdate) -> None:
        """Forgets deleted versions: a later session naming one asks again (and is refused)."""
        for key in update.removed_versions:
            self._versions.pop(key, None)

    def endpoints(self) -> EndpointSource:
        """The registry's endpoint watch, on the same channel, for the endpoint mirror."""
        return RegistryEndpoints(self._stub, ROUTER)


def _event(response: executor_pb2.ExecuteResponse) -> ExecutionEvent | None:
    kind = response.WhichOneof("event")
    if kind == "started":
        started = response.started
        if started.replayed:
            return Started(started.trace_id, replayed=True, invocation_id=started.invocation_id)
        return Started(started.trace_id)
    if kind == "chunk":
        return Chunk(response.chunk.data)
    if kind == "completed":
        return Completed(response.completed.duration_ms, response.completed.turn)
    return None


# A call to an executor that ends with one of these and no ErrorInfo never got an answer from it:
# the executor could not be reached or died mid-turn.
_TRANSPORT_FAILURES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
})


def executor_unavailable(err: grpc.aio.AioRpcError, executor: FleetMember) -> Unavailable:
    return Unavailable(
        f"{executor.resource} ({executor.address}) could not be reached or went away during the "
        f"turn ({err.code().name}: {(err.details() or '')[:120]}); retry: the session's next turn "
        "goes to a live executor, from its last committed state",
        reason=REASON_EXECUTOR_UNAVAILABLE, metadata={"executor": executor.resource},
        retry_delay_s=1.0,
    )


@contextmanager
def calling_executor(executor: FleetMember) -> Iterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        if exc.code() in _TRANSPORT_FAILURES and error_info(exc) is None:
            raise executor_unavailable(exc, executor) from None
        raise from_rpc_error(exc, "executor") from None


class ExecutorFleet:
    """The executors, each on a channel of its own to its advertised address, retired when it
    leaves the fleet (the calls under way on it go on)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._channels = ChannelPool(settings, "executor", executor_pb2_grpc.ExecutorServiceStub)

    async def execute(
        self, caller: Caller, invocation: Invocation, trace: TraceContext, executor: FleetMember
    ) -> AsyncGenerator[ExecutionEvent, None]:
        pin = invocation.resolved.pin
        request = executor_pb2.ExecuteRequest(
            session=pin.session.name, version=pin.version.name, digest=pin.digest,
            endpoint=pin.endpoint.name if pin.endpoint is not None else "",
            invocation_id=invocation.invocation_id, payload=invocation.payload,
            content_type=invocation.content_type, tenant=caller.tenant, user=caller.user,
            request_id=invocation.request_id,
        )
        stub = self._channels.stub(executor.address)
        call = stub.Execute(request, metadata=(*on_behalf_of(self._settings, caller), *trace))
        try:
            with calling_executor(executor):
                async for response in call:
                    event = _event(response)
                    if event is not None:
                        yield event
        except asyncio.CancelledError:
            # grpc.aio says a call cancelled on this side (its channel closed) this way too; only
            # a cancelled caller is a cancellation, anything else is an executor not reached.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise Unavailable(
                f"{executor.resource} ({executor.address}): the call was cut off on this side "
                "during the turn; retry: the session's next turn goes to a live executor, from its "
                "last committed state",
                reason=REASON_EXECUTOR_UNAVAILABLE, metadata={"executor": executor.resource},
                retry_delay_s=1.0,
            ) from None
        finally:
            # When the caller goes away the execution must end too, rather than run on (and
            # commit its turn) until the call object is garbage-collected.
            call.cancel()

    async def stop_session(self, caller: Caller, session: SessionRef, executor: FleetMember) -> None:
        metadata = (*on_behalf_of(self._settings, caller), *tracing.inject_metadata())
        with calling_executor(executor):
            await self._channels.stub(executor.address).StopSession(
                executor_pb2.StopSessionRequest(session=session.name), metadata=metadata,
            )

    async def fleet_changed(self, members: Sequence[FleetMember]) -> None:
        """Retires the channels of executors that left."""
        live = {m.address for m in members}
        for address in self._channels.addresses() - live:
            await self._channels.forget(address)

    async def close(self) -> None:
        await self._channels.close()


@dataclass(frozen=True)
class RouterClients:
    sessions: SessionsService
    registry: RegistryVersions
    executors: ExecutorFleet
    fleet: FleetClient

    @classmethod
    def open(cls, settings: Settings, stack: AsyncExitStack) -> RouterClients:
        """Clients on one channel per service (per executor), closed when `stack` closes."""
        clients = cls(
            SessionsService(settings), RegistryVersions(settings), ExecutorFleet(settings),
            FleetClient(settings),
        )
        for client in (clients.sessions, clients.registry, clients.executors, clients.fleet):
            stack.push_async_callback(client.close)
        return clients
