"""The executor's calls to other Corral services: sessions (leases, state, commits), the registry
(bundles, versions, endpoints, tool secrets) and telemetry (the agent's spans). Each returns
domain values and raises the domain error tree."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Protocol

import grpc
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from corral.names import SessionRef, VersionRef
from corral.registry.v1 import registry_pb2, registry_pb2_grpc
from corral.registry.v1 import tools_pb2 as reg
from corral.registry.v1 import tools_pb2_grpc as reg_grpc
from corral.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from services.common.background import TaskSet
from services.common.clients import ServiceClient, acting_in
from services.common.endpoint_watch import RegistryEndpoints
from services.common.endpoints import EndpointSource
from services.common.errors import FailedPrecondition
from services.common.identity import Caller
from services.common.settings import Settings
from services.common.status import calling, from_rpc_error
from services.executor.model import (
    AgentLogLine,
    FinishedTurn,
    Lease,
    LogOrigin,
    PackedBundle,
    ResolvedTool,
    SessionState,
)

log = logging.getLogger(__name__)

# How the executor names itself to the registry.
EXECUTOR = "executor"
_TOOL_KINDS = {reg.TOOL_KIND_HTTP: "http", reg.TOOL_KIND_GRPC: "grpc"}


class SessionsClient(ServiceClient["sessions_pb2_grpc.SessionsServiceAsyncStub"]):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "sessions", sessions_pb2_grpc.SessionsServiceStub)
        # Lease calls wait this long at most (a turn waits on acquire before it runs).
        self._lease_timeout_s = settings.executor.lease_call_timeout_s

    async def acquire(self, caller: Caller, session: SessionRef, holder: str, ttl_s: int) -> Lease:
        request = sessions_pb2.AcquireLeaseRequest(session=session.name, holder=holder)
        request.ttl.FromTimedelta(timedelta(seconds=ttl_s))
        with calling("sessions"):
            lease = await self._stub.AcquireLease(
                request, metadata=self.metadata(caller), timeout=self._lease_timeout_s)
        return Lease(lease.lease_id, _state(lease.state))

    async def renew(self, caller: Caller, session: SessionRef, lease_id: str, ttl_s: int) -> None:
        request = sessions_pb2.RenewLeaseRequest(session=session.name, lease_id=lease_id)
        request.ttl.FromTimedelta(timedelta(seconds=ttl_s))
        with calling("sessions"):
            await self._stub.RenewLease(
                request, metadata=self.metadata(caller), timeout=self._lease_timeout_s)

    async def release(self, caller: Caller, session: SessionRef, lease_id: str) -> None:
        request = sessions_pb2.ReleaseLeaseRequest(session=session.name, lease_id=lease_id)
        with calling("sessions"):
            await self._stub.ReleaseLease(
                request, metadata=self.metadata(caller), timeout=self._lease_timeout_s)

    async def commit(
        self, caller: Caller, session: SessionRef, lease_id: str, etag: str, turn: FinishedTurn
    ) -> SessionState:
        request = sessions_pb2.CommitTurnRequest(
            session=session.name, lease_id=lease_id, etag=etag, state=turn.state,
            invocation_id=turn.invocation_id, input=turn.input, output=turn.output,
        )
        with calling("sessions"):
            state = await self._stub.CommitTurn(request, metadata=self.metadata(caller))
        return _state(state)


def _state(state: sessions_pb2.SessionState) -> SessionState:
    return SessionState(state.state, state.etag, state.turn_count)


class RegistryClient(ServiceClient["registry_pb2_grpc.RegistryServiceAsyncStub"]):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "registry", registry_pb2_grpc.RegistryServiceStub)

    async def download(self, version: VersionRef, digest: str) -> PackedBundle:
        parts: list[bytes] = []
        by_digest = VersionRef(version.agent, digest=digest)
        every_tenant = acting_in()
        with calling("registry"):
            request = registry_pb2.DownloadVersionRequest(name=by_digest.name)
            async for message in self._stub.DownloadVersion(request, metadata=every_tenant):
                if message.HasField("chunk"):
                    parts.append(message.chunk)
        return PackedBundle(version, b"".join(parts))

    async def digest(self, tenant: str, version: VersionRef) -> str:
        acting = acting_in(tenant)
        with calling("registry"):
            found = await self._stub.GetVersion(
                registry_pb2.GetVersionRequest(name=version.name), metadata=acting)
        return found.digest

    def endpoints(self) -> EndpointSource:
        return RegistryEndpoints(self._stub, EXECUTOR)


class RegistryToolResolver(ServiceClient["reg_grpc.ToolSecretsServiceAsyncStub"]):
    """Resolves tools through the registry's internal ToolSecretsService."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "registry", reg_grpc.ToolSecretsServiceStub)

    async def resolve(self, tenant: str, tool: str, timeout_s: float) -> ResolvedTool | None:
        try:
            resolved = await self._stub.ResolveTool(
                reg.ResolveToolRequest(tenant=tenant, tool=tool), metadata=self.metadata(),
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise from_rpc_error(exc, "registry") from None
        t = resolved.tool
        if t.kind not in _TOOL_KINDS:
            raise FailedPrecondition(
                f"tool {tool!r} has a kind this executor does not know", reason="UNKNOWN_TOOL_KIND"
            )
        return ResolvedTool(
            tool=tool, kind=_TOOL_KINDS[t.kind], address=t.address,
            timeout_s=t.timeout.ToMilliseconds() / 1000, secret=resolved.secret,
        )


class TraceExport(Protocol):
    """The call of OTLP's TraceService that forwarding spans makes."""

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, *, timeout: float
    ) -> Awaitable[trace_service_pb2.ExportTraceServiceResponse]: ...


# opentelemetry-proto ships its *_pb2_grpc modules without annotations: typed here, once.
_trace_stub: Callable[[grpc.aio.Channel], TraceExport] = trace_service_pb2_grpc.TraceServiceStub


class TelemetrySpans(ServiceClient[TraceExport]):
    """Sends the agent's own spans (already OTLP-encoded inside the sandbox) to telemetry."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "telemetry", _trace_stub)
        self.enabled = settings.tracing
        self._sending = TaskSet("forwarding agent spans")

    def forward(self, encoded: bytes, trusted: Mapping[str, str]) -> None:
        """Sends the spans of one invocation, with `trusted` (agent, version, session, tenant...)
        stamped on their resource and removed from their own attributes: the spans come from
        untrusted code, which must not file them under another tenant or session."""
        if encoded and self.enabled:
            self._sending.spawn(self._send(encoded, dict(trusted)))

    async def _send(self, encoded: bytes, trusted: dict[str, str]) -> None:
        request = trace_service_pb2.ExportTraceServiceRequest()
        try:
            request.ParseFromString(encoded)
        except DecodeError:
            log.warning("dropped agent spans that do not parse as OTLP")
            return
        for resource_spans in request.resource_spans:
            _replace(resource_spans.resource.attributes, trusted)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    kept = [kv for kv in span.attributes
                            if kv.key not in trusted and not _counted_by_telemetry(kv.key)]
                    del span.attributes[:]
                    span.attributes.extend(kept)
        try:
            await self._stub.Export(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            log.warning("could not forward agent spans to telemetry: %s", exc.details())

    async def close(self) -> None:
        await self._sending.wait(timeout_s=2)
        await super().close()


class LogsExport(Protocol):
    """The call of OTLP's LogsService that forwarding an agent's output makes."""

    def Export(
        self, request: logs_service_pb2.ExportLogsServiceRequest, *, timeout: float
    ) -> Awaitable[logs_service_pb2.ExportLogsServiceResponse]: ...


_logs_stub: Callable[[grpc.aio.Channel], LogsExport] = logs_service_pb2_grpc.LogsServiceStub
# The OpenTelemetry source attribute of a line: stdout, stderr or the Python logger's name.
LOG_SOURCE_ATTR = "corral.log.source"


class TelemetryLogs(ServiceClient[LogsExport]):
    """Sends what an agent printed and logged to telemetry's LogsService as the executor, which
    telemetry trusts with the tenant, agent, version, session and invocation it stamps."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "telemetry", _logs_stub)
        self._sending = TaskSet("forwarding agent output")

    def forward(self, lines: Sequence[AgentLogLine], origin: LogOrigin) -> None:
        if lines:
            self._sending.spawn(self._send(logs_request(lines, origin)))

    async def _send(self, request: logs_service_pb2.ExportLogsServiceRequest) -> None:
        try:
            await self._stub.Export(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            log.warning("could not forward agent output to telemetry: %s", exc.details())

    async def close(self) -> None:
        await self._sending.wait(timeout_s=2)
        await super().close()


def logs_request(
    lines: Sequence[AgentLogLine], origin: LogOrigin
) -> logs_service_pb2.ExportLogsServiceRequest:
    """An invocation's lines as OTLP log records, its names on their resource, each record in
    the invocation's span."""
    resource = Resource()
    _replace(resource.attributes, {"service.name": "corral-agent", **origin.attributes})
    trace_id, span_id = bytes.fromhex(origin.trace_id), bytes.fromhex(origin.span_id)
    records = [
        logs_pb2.LogRecord(
            time_unix_nano=line.time_unix_nano, observed_time_unix_nano=line.time_unix_nano,
            severity_number=line.severity_number,  # type: ignore[arg-type]
            severity_text=line.severity_text, body=AnyValue(string_value=line.body),
            attributes=[KeyValue(key=LOG_SOURCE_ATTR, value=AnyValue(string_value=line.source))],
            trace_id=trace_id, span_id=span_id,
        )
        for line in lines
    ]
    return logs_service_pb2.ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
        resource=resource,
        scope_logs=[logs_pb2.ScopeLogs(scope=InstrumentationScope(name="corral.agent"),
                                       log_records=records)],
    )])


def _counted_by_telemetry(key: str) -> bool:
    """Attributes telemetry counts per version (invocations, tool calls, tokens): only the
    executor's own spans may carry them, or an agent could forge its version's figures."""
    return key in ("gen_ai.operation.name", "corral.tool.name") or key.startswith("gen_ai.usage.")


def _replace(attributes: RepeatedCompositeFieldContainer[KeyValue], values: Mapping[str, str]) -> None:
    """Sets string `values` in an OTLP KeyValue list, replacing what was there under those keys."""
    kept = [kv for kv in attributes if kv.key not in values]
    del attributes[:]
    attributes.extend(kept)
    for key, value in values.items():
        attributes.add(key=key).value.string_value = value
