"""The registry's endpoints over gRPC, as domain values: the EndpointSource behind every
EndpointMirror (routers and executors build theirs on the same channel as their other calls).
The watch is the service's own, for every tenant; reading one endpoint, it acts in its tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator

from corral.names import EndpointRef, ToolRef, VersionRef
from corral.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.clients import acting_in
from services.common.endpoints import EndpointTraffic, EndpointUpdate, TrafficShare
from services.common.status import calling


def endpoint_traffic(endpoint: registry_pb2.Endpoint) -> EndpointTraffic:
    rollback = endpoint.rollback_version
    return EndpointTraffic(
        ref=EndpointRef.parse(endpoint.name),
        salt=endpoint.salt,
        revision=endpoint.revision,
        shares=tuple(
            TrafficShare(VersionRef.parse(t.version).number, round(t.percent * 100))
            for t in endpoint.traffic
        ),
        rollback_version=VersionRef.parse(rollback).number if rollback else 0,
        tenant=endpoint.tenant,
    )


class RegistryEndpoints:
    def __init__(self, stub: registry_pb2_grpc.RegistryServiceAsyncStub, service: str) -> None:
        self._stub = stub
        self._service = service

    async def watch(self) -> AsyncIterator[EndpointUpdate]:
        every_tenant = acting_in()
        with calling("registry"):
            request = registry_pb2.WatchEndpointsRequest()
            async for message in self._stub.WatchEndpoints(request, metadata=every_tenant):
                yield EndpointUpdate(
                    tuple(endpoint_traffic(e) for e in message.endpoints), message.snapshot,
                    removed=tuple((e.tenant, EndpointRef.parse(e.name))
                                  for e in message.removed_endpoints),
                    removed_versions=tuple((v.tenant, VersionRef.parse(v.name))
                                           for v in message.removed_versions),
                    removed_bundles=tuple(message.removed_bundles),
                    changed_tools=tuple((t.tenant, ToolRef.parse(t.name))
                                        for t in message.changed_tools),
                )

    async def get(self, tenant: str, ref: EndpointRef) -> EndpointTraffic:
        acting = acting_in(tenant)
        with calling("registry"):
            found = await self._stub.GetEndpoint(
                registry_pb2.GetEndpointRequest(name=ref.name), metadata=acting)
        return endpoint_traffic(found)
