"""RegistryService over gRPC: requests to parsed names and domain values, one call into the
registry (registry.py), records back to messages. Only conversion here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol, TypeVar

from google.protobuf import struct_pb2

from corral import names
from corral.bundle import LIMITS, BundleLimits
from corral.names import AgentRef, EndpointRef, VersionRef
from corral.registry.v1 import registry_pb2 as pb
from corral.registry.v1 import registry_pb2_grpc
from services.common.identity import caller
from services.common.interceptors import Context
from services.common.paging import Page
from services.common.timestamps import timestamp
from services.registry import rules
from services.registry.model import (
    AgentRecord,
    AuditRecord,
    EndpointChange,
    EndpointRecord,
    Paging,
    VersionRecord,
)
from services.registry.registry import Registry
from services.registry.rollout_model import TrafficTarget

DOWNLOAD_CHUNK = 1024 * 1024
Row = TypeVar("Row")
Message = TypeVar("Message")
_PROTOCOLS = {"corral": pb.AGENT_PROTOCOL_CORRAL, "http": pb.AGENT_PROTOCOL_HTTP}


def agent_pb(r: AgentRecord) -> pb.Agent:
    return pb.Agent(
        name=r.ref.name,
        latest_version=r.ref.version(r.latest_version).name if r.latest_version else "",
        create_time=timestamp(r.create_time),
    )


def version_pb(r: VersionRecord) -> pb.Version:
    m = r.manifest
    params = struct_pb2.Struct()
    params.update(dict(m.model_params))
    return pb.Version(
        name=r.ref.name,
        number=r.number,
        digest=r.digest,
        size_bytes=r.size,
        create_time=timestamp(r.create_time),
        creator=r.creator,
        manifest=pb.Manifest(
            agent=m.name,
            entrypoint=m.entrypoint,
            protocol=_PROTOCOLS.get(m.protocol, pb.AGENT_PROTOCOL_UNSPECIFIED),
            model_provider=m.model_provider,
            model_id=m.model_id,
            model_params=params,
            prompt_file=m.prompt_file,
            tools=[t.name for t in m.tools],
            memory_mb=m.memory_mb,
            cpu_seconds=m.cpu_seconds,
            timeout_s=m.timeout_s,
            idle_timeout_s=m.idle_timeout_s,
            max_lifetime_s=m.max_lifetime_s,
        ),
    )


def endpoint_pb(r: EndpointRecord) -> pb.Endpoint:
    agent = r.ref.parent
    return pb.Endpoint(
        name=r.ref.name,
        traffic=[
            pb.TrafficTarget(version=agent.version(s.version).name, percent=s.percent)
            for s in r.traffic
        ],
        follow_latest=r.follow_latest,
        salt=r.salt,
        etag=r.etag,
        revision=r.revision,
        create_time=timestamp(r.create_time),
        update_time=timestamp(r.update_time),
        description=r.description,
        rollback_version=agent.version(r.rollback_version).name if r.rollback_version else "",
    )


def audit_pb(r: AuditRecord) -> pb.AuditEvent:
    details = struct_pb2.Struct()
    details.update(dict(r.details))
    return pb.AuditEvent(
        name=f"auditEvents/{r.id}", time=timestamp(r.time), tenant=r.tenant, user=r.user,
        method=r.method, resource=r.resource, details=details,
    )


def traffic_targets(
    targets: Sequence[pb.TrafficTarget], field: str = "endpoint.traffic"
) -> tuple[TrafficTarget, ...]:
    return tuple(
        TrafficTarget(VersionRef.parse(t.version, field=f"{field}[{i}].version"), t.percent)
        for i, t in enumerate(targets)
    )


class PageFields(Protocol):
    """The paging fields every List request has."""

    page_size: int
    page_token: str


def paging(request: PageFields, context: Context) -> Paging:
    return Paging(caller(context), request.page_size, request.page_token)


def each(page: Page[Row], to_pb: Callable[[Row], Message]) -> list[Message]:
    return [to_pb(r) for r in page.items]


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
        description=endpoint.description if "description" in paths else None,
    )


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: Registry, limits: BundleLimits = LIMITS) -> None:
        self.registry = registry
        self.limits = limits

    async def CreateAgent(self, request: pb.CreateAgentRequest, context: Context) -> pb.Agent:
        agent = AgentRef(names.AGENT_IDS.check(request.agent_id, field="agent_id"))
        return agent_pb(await self.registry.create_agent(caller(context), agent))

    async def GetAgent(self, request: pb.GetAgentRequest, context: Context) -> pb.Agent:
        return agent_pb(await self.registry.get_agent(AgentRef.parse(request.name)))

    async def ListAgents(self, request: pb.ListAgentsRequest, context: Context) -> pb.ListAgentsResponse:
        page = await self.registry.list_agents(paging(request, context))
        return pb.ListAgentsResponse(agents=each(page, agent_pb), next_page_token=page.next_page_token)

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
        version, _created = await self.registry.publish(
            caller(context), _any_agent(header.parent, "header.parent"), data, header.digest,
            header.request_id,
        )
        return version_pb(version)

    async def GetVersion(self, request: pb.GetVersionRequest, context: Context) -> pb.Version:
        version = VersionRef.parse(request.name, allow_digest=True)
        return version_pb(await self.registry.get_version(version))

    async def ListVersions(self, request: pb.ListVersionsRequest, context: Context) -> pb.ListVersionsResponse:
        page = await self.registry.list_versions(_agent(request.parent), paging(request, context))
        return pb.ListVersionsResponse(versions=each(page, version_pb), next_page_token=page.next_page_token)

    async def DownloadVersion(
        self, request: pb.DownloadVersionRequest, context: Context
    ) -> AsyncIterator[pb.DownloadVersionResponse]:
        version = VersionRef.parse(request.name, allow_digest=True)
        record, data = await self.registry.download(version)
        yield pb.DownloadVersionResponse(version=version_pb(record))
        for i in range(0, len(data), DOWNLOAD_CHUNK):
            yield pb.DownloadVersionResponse(chunk=data[i : i + DOWNLOAD_CHUNK])

    async def CreateEndpoint(
        self, request: pb.CreateEndpointRequest, context: Context
    ) -> pb.Endpoint:
        agent = AgentRef.parse(request.parent, field="parent")
        endpoint = agent.endpoint(names.ENDPOINT_IDS.check(request.endpoint_id, field="endpoint_id"))
        change = EndpointChange(traffic_targets(request.endpoint.traffic), request.endpoint.description)
        record = await self.registry.set_endpoint(
            caller(context), endpoint, change, allow_missing=True, must_create=True,
            method="CreateEndpoint",
        )
        return endpoint_pb(record)

    async def GetEndpoint(self, request: pb.GetEndpointRequest, context: Context) -> pb.Endpoint:
        return endpoint_pb(await self.registry.get_endpoint(EndpointRef.parse(request.name)))

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

    async def WatchEndpoints(
        self, request: pb.WatchEndpointsRequest, context: Context
    ) -> AsyncIterator[pb.WatchEndpointsResponse]:
        async for records, snapshot in self.registry.watch(_any_agent(request.parent)):
            yield pb.WatchEndpointsResponse(endpoints=[endpoint_pb(r) for r in records], snapshot=snapshot)

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: Context) -> pb.ListAuditEventsResponse:
        page = await self.registry.list_audit(request.resource_prefix, paging(request, context))
        return pb.ListAuditEventsResponse(events=each(page, audit_pb), next_page_token=page.next_page_token)
