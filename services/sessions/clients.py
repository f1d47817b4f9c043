"""The services the sessions service calls: the registry, whether a tenant has the version a new
session is pinned to with those bytes; the executor, to end the sandbox of a deleted session."""

from __future__ import annotations

from corral.executor.v1 import executor_pb2, executor_pb2_grpc
from corral.names import SessionRef, VersionRef
from corral.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.clients import ChannelPool, ServiceClient, acting_in
from services.common.errors import InvalidArgument
from services.common.identity import Caller
from services.common.settings import Settings
from services.common.status import calling

# Deleting a session waits this long for its sandbox to stop.
STOP_TIMEOUT_S = 10


class RegistryPins(ServiceClient["registry_pb2_grpc.RegistryServiceAsyncStub"]):
    """Implements PinCheck. Versions never change once published: each is asked for once."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "registry", registry_pb2_grpc.RegistryServiceStub)
        self._digests: dict[tuple[str, VersionRef], str] = {}

    async def check(self, tenant: str, version: VersionRef, digest: str) -> None:
        known = self._digests.get((tenant, version))
        if known is None:
            # Asked in the tenant: another tenant's version is NOT_FOUND, as one no one has.
            with calling("registry"):
                found = await self._stub.GetVersion(
                    registry_pb2.GetVersionRequest(name=version.name), metadata=acting_in(tenant))
            known = self._digests[(tenant, version)] = found.digest
        if known != digest:
            raise InvalidArgument.field(
                "session.version_digest", f"{version.name} is {known}, not {digest[:80]!r}"
            )


class ExecutorSandboxes(ServiceClient["executor_pb2_grpc.ExecutorServiceAsyncStub"]):
    """Implements SandboxStop (the executor at CORRAL_EXECUTOR_ADDR, for a session never placed)
    and SandboxStopAt (a member of the fleet, at its address)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "executor", executor_pb2_grpc.ExecutorServiceStub)
        self._fleet = ChannelPool(settings, "executor", executor_pb2_grpc.ExecutorServiceStub)

    async def stop_sandbox_at(self, address: str, caller: Caller, session: SessionRef) -> None:
        with calling("executor"):
            await self._fleet.stub(address).StopSession(
                executor_pb2.StopSessionRequest(session=session.name),
                metadata=self.metadata(caller), timeout=STOP_TIMEOUT_S,
            )

    async def close(self) -> None:
        await self._fleet.close()
        await super().close()

    async def stop_sandbox(self, caller: Caller, session: SessionRef) -> None:
        with calling("executor"):
            await self._stub.StopSession(
                executor_pb2.StopSessionRequest(session=session.name),
                metadata=self.metadata(caller), timeout=STOP_TIMEOUT_S,
            )
