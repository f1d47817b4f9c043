"""The registry as one registry test talks to it: a stub, an agent of the test's own (the
database is shared by the run), its bundles packed, and endpoint bodies for its versions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from corral.registry.v1 import registry_pb2 as pb
from corral.registry.v1 import registry_pb2_grpc
from services.common.settings import Settings
from tests.bundles import packed_agent, publish_requests
from tests.rpc import Metadata, who

ALICE = who("acme")


@dataclass
class Registry:
    settings: Settings
    stub: registry_pb2_grpc.RegistryServiceAsyncStub
    tmp: Path
    agent: str

    def bundle(self, name: str = "", prompt: str = "You help.\n", **extra: str | bytes) -> bytes:
        """The packed bytes of a small agent (this test's agent unless `name` is given)."""
        return packed_agent(self.tmp, name or self.agent, prompt=prompt, **extra)

    async def publish(self, data: bytes, metadata: Metadata = ALICE, **header: str) -> pb.Version:
        return await self.stub.PublishVersion(
            iter(publish_requests(data, **header)),
            metadata=metadata,  # type: ignore[arg-type]
        )

    async def versions(self) -> list[int]:
        listed = await self.stub.ListVersions(pb.ListVersionsRequest(parent=f"agents/{self.agent}"))
        return [v.number for v in listed.versions]

    async def endpoint(self, endpoint: str) -> pb.Endpoint:
        return await self.stub.GetEndpoint(
            pb.GetEndpointRequest(name=f"agents/{self.agent}/endpoints/{endpoint}")
        )

    def body(
        self, endpoint: str, split: Iterable[tuple[int, float]], etag: str = ""
    ) -> pb.Endpoint:
        return pb.Endpoint(
            name=f"agents/{self.agent}/endpoints/{endpoint}",
            etag=etag,
            traffic=[
                pb.TrafficTarget(version=f"agents/{self.agent}/versions/{v}", percent=p)
                for v, p in split
            ],
        )
