"""All five services started in-process, as a client sees them: a Mesh holds a stub for each and
publishes, routes and invokes agents through them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from corral import names
from corral.bundle import pack
from corral.executor.v1 import executor_pb2, executor_pb2_grpc
from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import registry_pb2_grpc
from corral.router.v1 import router_pb2 as rt
from corral.router.v1 import router_pb2_grpc
from corral.sessions.v1 import sessions_pb2_grpc
from corral.telemetry.v1 import telemetry_pb2_grpc
from services.common.server import ServiceHost
from services.common.settings import Settings
from tests import harness
from tests.bundles import agent_files, copy_example, publish_requests, write_bundle
from tests.credentials import public_channel
from tests.rpc import Metadata, body, new_tenant, who

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@dataclass
class Mesh:
    """A client's view of the five services: a stub for each, and a tenant and an agent prefix of
    a test's own (the database is shared by the run)."""

    settings: Settings
    hosts: dict[str, ServiceHost]
    tmp: Path
    prefix: str
    tenant: str
    registry: registry_pb2_grpc.RegistryServiceAsyncStub
    router: router_pb2_grpc.RouterServiceAsyncStub
    sessions: sessions_pb2_grpc.SessionsServiceAsyncStub
    executor: executor_pb2_grpc.ExecutorServiceAsyncStub
    telemetry: telemetry_pb2_grpc.TelemetryServiceAsyncStub

    @property
    def me(self) -> Metadata:
        return who(self.tenant)

    async def publish(self, root: Path) -> reg.Version:
        requests = publish_requests(pack(root))
        return await self.registry.PublishVersion(iter(requests), metadata=self.me)

    async def publish_examples(self) -> str:
        """Both progress-report examples as versions 1 and 2 of an agent of this test's own."""
        agent = f"{self.prefix}-pr"
        for n, example in ((1, "progress-report"), (2, "progress-report-v2")):
            root = copy_example(EXAMPLES / example, self.tmp / example, agent)
            assert (await self.publish(root)).number == n
        return agent

    async def publish_agent(self, suffix: str, code: str, toml_extra: str = "") -> str:
        agent = f"{self.prefix}-{suffix}"
        files = agent_files(agent, code, toml_extra=toml_extra)
        await self.publish(write_bundle(self.tmp / agent, files))
        return agent

    async def set_split(
        self, agent: str, endpoint: str, split: list[tuple[int, float]]
    ) -> reg.Endpoint:
        updated = await self.registry.UpdateEndpoint(
            reg.UpdateEndpointRequest(
                endpoint=reg.Endpoint(
                    name=f"agents/{agent}/endpoints/{endpoint}",
                    traffic=[
                        reg.TrafficTarget(version=f"agents/{agent}/versions/{v}", percent=p)
                        for v, p in split
                    ],
                ),
                allow_missing=True,
            ),
            metadata=self.me,
        )
        await self.router_sees(agent, endpoint, updated.revision)
        return updated

    async def router_sees(self, agent: str, endpoint: str, revision: int) -> None:
        """Waits until the router's endpoint cache, fed by the registry's watch, has `revision`
        (the change propagates asynchronously; this keeps the test from racing it)."""
        cache = self.hosts["router"].service.router.endpoints  # type: ignore[attr-defined]
        async with asyncio.timeout(5):
            while True:
                view = cache.cached(names.EndpointRef(agent, endpoint))
                if view is not None and view.revision >= revision:
                    return
                await asyncio.sleep(0.01)

    async def sandboxes(self) -> list[executor_pb2.Sandbox]:
        """The executor's sandboxes, as ListSandboxes lists them."""
        return list((await self.executor.ListSandboxes(executor_pb2.ListSandboxesRequest())).sandboxes)

    async def invoke(
        self, agent: str, payload: object = None, metadata: Metadata | None = None, **target: str
    ) -> rt.InvokeResponse:
        return await self.router.Invoke(
            rt.InvokeRequest(
                agent=f"agents/{agent}",
                payload=body(
                    payload if payload is not None else {"text": "The client slept better."}
                ),
                **target,  # type: ignore[arg-type]
            ),
            metadata=metadata or self.me,
        )


@asynccontextmanager
async def connect(
    settings: Settings, hosts: dict[str, ServiceHost], tmp: Path
) -> AsyncIterator[Mesh]:
    """A Mesh over the services `settings` say are serving; its channels close at the end."""
    channels = {svc: public_channel(settings.addrs[svc]) for svc in harness.MESH}
    try:
        yield Mesh(
            settings=settings,
            hosts=hosts,
            tmp=tmp,
            prefix=f"m{uuid.uuid4().hex[:8]}",
            tenant=new_tenant(),
            registry=registry_pb2_grpc.RegistryServiceStub(channels["registry"]),
            router=router_pb2_grpc.RouterServiceStub(channels["router"]),
            sessions=sessions_pb2_grpc.SessionsServiceStub(channels["sessions"]),
            executor=executor_pb2_grpc.ExecutorServiceStub(channels["executor"]),
            telemetry=telemetry_pb2_grpc.TelemetryServiceStub(channels["telemetry"]),
        )
    finally:
        for channel in channels.values():
            await channel.close()


@asynccontextmanager
async def started_mesh(settings: Settings, tmp: Path) -> AsyncIterator[Mesh]:
    """All five services started on `settings`, and a Mesh over them; stopped at the end."""
    platform = await harness.start_mesh(settings)
    try:
        async with connect(platform.settings, platform.hosts, tmp) as mesh:
            yield mesh
    finally:
        await platform.stop()


def version_of(response: rt.InvokeResponse) -> int:
    """The number of the version that answered an invocation."""
    return int(response.info.version.rsplit("/", 1)[1])
