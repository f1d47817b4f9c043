"""RegistryService over gRPC: requests to parsed names and domain values, one call into the
registry (registry.py), records back to messages. Only conversion here."""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf import empty_pb2

from corral import names
from corral.bundle import LIMITS, BundleLimits
from corral.names import AgentRef, EndpointRef, VersionRef
from corral.registry.v1 import registry_pb2 as pb
from corral.registry.v1 import registry_pb2_grpc
from services.common.identity import caller
from services.common.interceptors import Context
from services.registry import rules
from services.registry.lifecycle import Lifecycle
from services.registry.messages import (
    agent_pb,
    audit_pb,
    checking_metadata,
    each,
    endpoint_pb,
    paging,
    traffic_targets,
    version_pb,
    watch_event_pb,
)
from services.registry.model import EndpointChange, VersionRecord
from services.registry.registry import Registry

DOWNLOAD_CHUNK = 1024 * 1024


def _agent(parent: str) -> AgentRef:
    return AgentRef.parse(parent, field="parent")


def _any_agent(parent: str, field: str = "parent") -> AgentRef | None:
    """An agent name where an empty one means "every agent" (or "whichever the bundle names")."""
    return AgentRef.parse(parent, field=field) if parent else None


def endpoint_change(request: pb.UpdateEndpointRequest) -> EndpointChange:
    """The fields an UpdateEndpoint sets: those in its update_mask, or (no mask) both."""
    paths = rules.update_paths(request.update_mask.paths, rules.ENDPOINT_FIELDS, rules.ENDPOINT_FIELDS)
    endpoint = request.endpoint
    return EndpointChange(
        traffic=traffic_targets(endpoint.traffic) if "traffic" in paths else None,
        description=rules.endpoint_description(endpoint.description) if "description" in paths else None,
    )


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(
        self, registry: Registry, lifecycle: Lifecycle, limits: BundleLimits = LIMITS
    ) -> None:
        self.registry = registry
        self.lifecycle = lifecycle
        self.limits = limits

    async def CreateAgent(self, request: pb.CreateAgentRequest, context: Context) -> pb.Agent:
        agent = AgentRef(names.AGENT_IDS.check(request.agent_id, field="agent_id"))
        return agent_pb(await self.registry.create_agent(caller(context), agent))

    async def GetAgent(self, request: pb.GetAgentRequest, context: Context) -> pb.Agent:
        return agent_pb(await self.registry.get_agent(caller(context), AgentRef.parse(request.name)))

    async def ListAgents(self, request: pb.ListAgentsRequest, context: Context) -> pb.ListAgentsResponse:
        page = await self.registry.list_agents(paging(request, context))
        return pb.ListAgentsResponse(agents=each(page, agent_pb), next_page_token=page.next_page_token)

    async def DeleteAgent(self, request: pb.DeleteAgentRequest, context: Context) -> empty_pb2.Empty:
        agent = AgentRef.parse(request.name)
        await self.lifecycle.delete_agent(caller(context), agent, force=request.force)
        return empty_pb2.Empty()

    async def PublishVersion(
        self, request_iterator: AsyncIterator[pb.PublishVersionRequest], context: Context
    ) -> pb.Version:
        upload = rules.BundleUpload(self.limits)
        async for message in request_iterator:
            if message.HasField("header"):
                h = message.header
                upload.header(rules.UploadHeader(h.parent, h.digest, h.size_bytes, h.request_id))
            else:
                upload.chunk(message.chunk)
        header, data = upload.finish()

        async def checking(version: VersionRecord) -> None:
            await context.send_initial_metadata(checking_metadata(version))

        version, _created = await self.registry.publish(
            caller(context), _any_agent(header.parent, "header.parent"), data, header.digest,
            header.request_id, checking,
        )
        return version_pb(version)

    async def GetVersion(self, request: pb.GetVersionRequest, context: Context) -> pb.Version:
        version = VersionRef.parse(request.name, allow_digest=True)
        return version_pb(await self.registry.get_version(caller(context), version))

    async def ListVersions(self, request: pb.ListVersionsRequest, context: Context) -> pb.ListVersionsResponse:
        page = await self.registry.list_versions(_agent(request.parent), paging(request, context))
        return pb.ListVersionsResponse(versions=each(page, version_pb), next_page_token=page.next_page_token)

    async def DownloadVersion(
        self, request: pb.DownloadVersionRequest, context: Context
    ) -> AsyncIterator[pb.DownloadVersionResponse]:
        version = VersionRef.parse(request.name, allow_digest=True)
        record, data = await self.registry.download(caller(context), version)
        yield pb.DownloadVersionResponse(version=version_pb(record))
        for i in range(0, len(data), DOWNLOAD_CHUNK):
            yield pb.DownloadVersionResponse(chunk=data[i : i + DOWNLOAD_CHUNK])

    async def DeleteVersion(
        self, request: pb.DeleteVersionRequest, context: Context
    ) -> empty_pb2.Empty:
        await self.lifecycle.delete_version(caller(context), VersionRef.parse(request.name))
        return empty_pb2.Empty()

    async def CreateEndpoint(
        self, request: pb.CreateEndpointRequest, context: Context
    ) -> pb.Endpoint:
        agent = AgentRef.parse(request.parent, field="parent")
        endpoint = agent.endpoint(names.ENDPOINT_IDS.check(request.endpoint_id, field="endpoint_id"))
        change = EndpointChange(
            traffic_targets(request.endpoint.traffic),
            rules.endpoint_description(request.endpoint.description),
        )
        record = await self.registry.set_endpoint(
            caller(context), endpoint, change, allow_missing=True, must_create=True,
            method="CreateEndpoint",
        )
        return endpoint_pb(record)

    async def GetEndpoint(self, request: pb.GetEndpointRequest, context: Context) -> pb.Endpoint:
        endpoint = EndpointRef.parse(request.name)
        return endpoint_pb(await self.registry.get_endpoint(caller(context), endpoint))

    async def ListEndpoints(self, request: pb.ListEndpointsRequest, context: Context) -> pb.ListEndpointsResponse:
        page = await self.registry.list_endpoints(_any_agent(request.parent), paging(request, context))
        return pb.ListEndpointsResponse(endpoints=each(page, endpoint_pb), next_page_token=page.next_page_token)

    async def UpdateEndpoint(
        self, request: pb.UpdateEndpointRequest, context: Context
    ) -> pb.Endpoint:
        endpoint = EndpointRef.parse(request.endpoint.name, field="endpoint.name")
        record = await self.registry.set_endpoint(
            caller(context), endpoint, endpoint_change(request), etag=request.endpoint.etag,
            allow_missing=request.allow_missing,
        )
        return endpoint_pb(record)

    async def DeleteEndpoint(
        self, request: pb.DeleteEndpointRequest, context: Context
    ) -> empty_pb2.Empty:
        endpoint = EndpointRef.parse(request.name)
        await self.lifecycle.delete_endpoint(caller(context), endpoint, etag=request.etag)
        return empty_pb2.Empty()

    async def WatchEndpoints(
        self, request: pb.WatchEndpointsRequest, context: Context
    ) -> AsyncIterator[pb.WatchEndpointsResponse]:
        watched = self.registry.watch(caller(context), _any_agent(request.parent))
        async for event in watched:
            yield watch_event_pb(event)

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: Context) -> pb.ListAuditEventsResponse:
        prefix = rules.audit_prefix(request.resource_prefix)
        page = await self.registry.list_audit(prefix, paging(request, context))
        return pb.ListAuditEventsResponse(events=each(page, audit_pb), next_page_token=page.next_page_token)
