"""Messages ↔ registry values, shared by the registry's servicers: agents, versions, endpoints,
audit events, traffic as requests carry it, and the paging every List method takes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from google.protobuf import struct_pb2

from corral.client import START_CHECK_HEADER, VERSION_HEADER
from corral.names import VersionRef
from corral.registry.v1 import registry_pb2 as pb
from services.common.identity import caller
from services.common.interceptors import Context
from services.common.paging import Page
from services.common.timestamps import timestamp
from services.registry.model import (
    AgentRecord,
    AuditRecord,
    EndpointRecord,
    Paging,
    VersionRecord,
    VersionState,
    WatchEvent,
)
from services.registry.rollout_model import TrafficTarget

Row = TypeVar("Row")
Message = TypeVar("Message")
_PROTOCOLS = {"corral": pb.AGENT_PROTOCOL_CORRAL, "http": pb.AGENT_PROTOCOL_HTTP}
_STATES = {
    VersionState.CHECKING: pb.Version.STATE_CHECKING,
    VersionState.READY: pb.Version.STATE_READY,
    VersionState.FAILED: pb.Version.STATE_FAILED,
}


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
        state=_STATES[r.state],
        failure=pb.VersionFailure(
            error_type=r.failure.error_type, message=r.failure.message,
            traceback=r.failure.traceback,
        ) if r.failure is not None else None,
    )


def checking_metadata(r: VersionRecord) -> tuple[tuple[str, str], ...]:
    return ((VERSION_HEADER, r.ref.name), (START_CHECK_HEADER, "running"))


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
        tenant=r.tenant,
    )


def watch_event_pb(event: WatchEvent) -> pb.WatchEndpointsResponse:
    return pb.WatchEndpointsResponse(
        endpoints=[endpoint_pb(r) for r in event.endpoints],
        snapshot=event.snapshot,
        removed_endpoints=[pb.Endpoint(name=ref.name, tenant=tenant) for tenant, ref in event.removed],
        removed_versions=[pb.RemovedVersion(tenant=tenant, name=ref.name)
                          for tenant, ref in event.removed_versions],
        removed_bundles=event.removed_bundles,
        changed_tools=[pb.ChangedTool(tenant=tenant, name=ref.name)
                       for tenant, ref in event.changed_tools],
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
