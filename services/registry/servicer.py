"""gRPC ↔ registry domain. Only conversion here; the logic is in registry.py."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import grpc
from google.protobuf import struct_pb2

from corral import names
from corral.bundle import (
    LIMITS,
    BundleError,
    BundleLimits,
    BundleTooLarge,
    check_size,
    unpacked_size,
)
from corral.registry.v1 import registry_pb2 as pb
from corral.registry.v1 import registry_pb2_grpc
from services.common.errors import FieldViolation, InvalidArgument
from services.common.identity import caller
from services.common.paging import paged
from services.common.timestamps import timestamp
from services.registry.registry import Registry, parse_name
from services.registry.store import AgentRecord, AuditRecord, EndpointRecord, VersionRecord

DOWNLOAD_CHUNK = 1024 * 1024
_PROTOCOLS = {"corral": pb.AGENT_PROTOCOL_CORRAL, "http": pb.AGENT_PROTOCOL_HTTP}


def agent_pb(r: AgentRecord) -> pb.Agent:
    return pb.Agent(
        name=names.agent_name(r.id),
        latest_version=names.version_name(r.id, r.latest_version) if r.latest_version else "",
        create_time=timestamp(r.create_time),
    )


def version_pb(r: VersionRecord) -> pb.Version:
    m = r.manifest
    params = struct_pb2.Struct()
    params.update(dict(m.get("model_params", {})))
    return pb.Version(
        name=names.version_name(r.agent, r.number),
        number=r.number,
        digest=r.digest,
        size_bytes=r.size,
        create_time=timestamp(r.create_time),
        creator=r.creator,
        manifest=pb.Manifest(
            agent=m["name"],
            entrypoint=m["entrypoint"],
            protocol=_PROTOCOLS.get(m.get("protocol", "corral"), pb.AGENT_PROTOCOL_UNSPECIFIED),
            model_provider=m.get("model_provider", ""),
            model_id=m.get("model_id", ""),
            model_params=params,
            prompt_file=m.get("prompt_file", ""),
            tools=[t["name"] for t in m.get("tools", ())],
            memory_mb=m.get("memory_mb", 0),
            cpu_seconds=m.get("cpu_seconds", 0),
            timeout_s=m.get("timeout_s", 0),
            idle_timeout_s=m.get("idle_timeout_s", 0),
            max_lifetime_s=m.get("max_lifetime_s", 0),
        ),
    )


def endpoint_pb(r: EndpointRecord) -> pb.Endpoint:
    return pb.Endpoint(
        name=names.endpoint_name(r.agent, r.id),
        traffic=[
            pb.TrafficTarget(version=names.version_name(r.agent, s.version), percent=s.percent)
            for s in r.traffic
        ],
        follow_latest=r.follow_latest,
        salt=r.salt,
        etag=r.etag,
        revision=r.revision,
        create_time=timestamp(r.create_time),
        update_time=timestamp(r.update_time),
        description=r.description,
        rollback_version=(
            names.version_name(r.agent, r.rollback_version) if r.rollback_version else ""
        ),
    )


def audit_pb(r: AuditRecord) -> pb.AuditEvent:
    details = struct_pb2.Struct()
    details.update(dict(r.details))
    return pb.AuditEvent(
        name=f"auditEvents/{r.id}", time=timestamp(r.time), tenant=r.tenant, user=r.user,
        method=r.method, resource=r.resource, details=details,
    )


def _split(agent: str, endpoint: pb.Endpoint) -> list[tuple[int, float]]:
    out = []
    for i, target in enumerate(endpoint.traffic):
        ref = parse_name(names.parse_version, target.version, f"endpoint.traffic[{i}].version")
        assert isinstance(ref, names.VersionRef)
        if ref.agent != agent:
            raise InvalidArgument.field(
                f"endpoint.traffic[{i}].version", f"{target.version} belongs to another agent"
            )
        out.append((ref.number, target.percent))
    return out


def _too_large(exc: BundleTooLarge) -> InvalidArgument:
    """The caller must make the bundle smaller: INVALID_ARGUMENT, with the sizes for tools."""
    sizes = {"packed_bytes": exc.packed, "packed_limit_bytes": exc.limits.packed_bytes,
             "unpacked_limit_bytes": exc.limits.unpacked_bytes}
    if exc.unpacked is not None:
        sizes["unpacked_bytes"] = exc.unpacked
    return InvalidArgument(
        exc.description,
        reason="BUNDLE_TOO_LARGE",
        violations=[FieldViolation("chunk", exc.description)],
        metadata={k: str(v) for k, v in sizes.items()},
    )


def _check_unpacked(data: bytes, limits: BundleLimits) -> None:
    try:
        check_size(len(data), unpacked_size(data), limits)
    except BundleTooLarge as exc:
        raise _too_large(exc) from None
    except BundleError:
        pass  # not a tar: the registry's own checks report that, with the rest


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: Registry, limits: BundleLimits = LIMITS) -> None:
        self.registry = registry
        self.limits = limits

    async def CreateAgent(self, request: pb.CreateAgentRequest, context: grpc.aio.ServicerContext) -> pb.Agent:
        return agent_pb(await self.registry.create_agent(caller(context), request.agent_id))

    async def GetAgent(self, request: pb.GetAgentRequest, context: grpc.aio.ServicerContext) -> pb.Agent:
        return agent_pb(await self.registry.get_agent(request.name))

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAgentsResponse:
        rows, token = await paged(request, self.registry.list_agents)
        return pb.ListAgentsResponse(
            agents=[agent_pb(r) for r in rows], next_page_token=token
        )

    async def PublishVersion(
        self, request_iterator: AsyncIterator[pb.PublishVersionRequest], context: grpc.aio.ServicerContext
    ) -> pb.Version:
        header: pb.PublishVersionHeader | None = None
        parts: list[bytes] = []
        received = 0
        hasher = hashlib.sha256()
        async for message in request_iterator:
            if message.HasField("header"):
                if header is not None:
                    raise InvalidArgument.field("header", "sent twice; send it once, first")
                header = message.header
                continue
            if header is None:
                raise InvalidArgument.field("header", "must be the first message of the stream")
            received += len(message.chunk)
            # Stop reading as soon as the upload passes the limit, not after holding all of it.
            if received > self.limits.packed_bytes:
                raise _too_large(BundleTooLarge(received, None, self.limits))
            hasher.update(message.chunk)
            parts.append(message.chunk)
        if header is None:
            raise InvalidArgument.field("header", "the stream was empty")
        if header.size_bytes and header.size_bytes != received:
            raise InvalidArgument.field(
                "header.size_bytes", f"announced {header.size_bytes} bytes but {received} arrived"
            )
        if received == 0:
            raise InvalidArgument.field("chunk", "no bundle bytes were sent")
        data = b"".join(parts)
        _check_unpacked(data, self.limits)
        version, _created = await self.registry.publish(
            caller(context), header.parent, data, header.digest, header.request_id
        )
        return version_pb(version)

    async def GetVersion(self, request: pb.GetVersionRequest, context: grpc.aio.ServicerContext) -> pb.Version:
        return version_pb(await self.registry.get_version(request.name))

    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListVersionsResponse:
        rows, token = await paged(request, lambda o, n: self.registry.list_versions(request.parent, o, n))
        return pb.ListVersionsResponse(
            versions=[version_pb(r) for r in rows], next_page_token=token
        )

    async def DownloadVersion(
        self, request: pb.DownloadVersionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadVersionResponse]:
        version, data = await self.registry.download(request.name)
        yield pb.DownloadVersionResponse(version=version_pb(version))
        for i in range(0, len(data), DOWNLOAD_CHUNK):
            yield pb.DownloadVersionResponse(chunk=data[i : i + DOWNLOAD_CHUNK])

    async def CreateEndpoint(
        self, request: pb.CreateEndpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.Endpoint:
        agent = parse_name(names.parse_agent, request.parent, "parent")
        if not names.valid_endpoint_id(request.endpoint_id):
            raise InvalidArgument.field(
                "endpoint_id", f"{request.endpoint_id!r} must start with a letter; letters, digits, _ and -"
            )
        name = names.endpoint_name(str(agent), request.endpoint_id)
        record = await self.registry.set_endpoint(
            caller(context), name, _split(str(agent), request.endpoint),
            allow_missing=True, must_create=True, description=request.endpoint.description,
            method="CreateEndpoint",
        )
        return endpoint_pb(record)

    async def GetEndpoint(self, request: pb.GetEndpointRequest, context: grpc.aio.ServicerContext) -> pb.Endpoint:
        return endpoint_pb(await self.registry.get_endpoint(request.name))

    async def ListEndpoints(
        self, request: pb.ListEndpointsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListEndpointsResponse:
        rows, token = await paged(request, lambda o, n: self.registry.list_endpoints(request.parent, o, n))
        return pb.ListEndpointsResponse(
            endpoints=[endpoint_pb(r) for r in rows], next_page_token=token
        )

    async def UpdateEndpoint(
        self, request: pb.UpdateEndpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.Endpoint:
        endpoint = request.endpoint
        agent, _ = parse_name(names.parse_endpoint, endpoint.name, "endpoint.name")  # type: ignore[misc]
        record = await self.registry.set_endpoint(
            caller(context), endpoint.name, _split(agent, endpoint), etag=endpoint.etag,
            allow_missing=request.allow_missing, description=endpoint.description,
        )
        return endpoint_pb(record)

    async def WatchEndpoints(
        self, request: pb.WatchEndpointsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchEndpointsResponse]:
        async for records, snapshot in self.registry.watch(request.parent):
            yield pb.WatchEndpointsResponse(endpoints=[endpoint_pb(r) for r in records], snapshot=snapshot)

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAuditEventsResponse:
        rows, token = await paged(request, lambda o, n: self.registry.list_audit(request.resource_prefix, o, n))
        return pb.ListAuditEventsResponse(
            events=[audit_pb(r) for r in rows], next_page_token=token
        )
