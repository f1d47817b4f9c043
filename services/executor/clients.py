"""The executor's calls to other Corral services: sessions (leases, state, commits), the registry
(bundles, versions, endpoints, tool secrets) and telemetry (spans, log records and delivery
reports, through services/executor/delivery.py). Each returns
domain values and raises the domain error tree."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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
from corral.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.clients import ServiceClient, acting_in, channel
from services.common.endpoint_watch import RegistryEndpoints
from services.common.endpoints import EndpointSource
from services.common.errors import FailedPrecondition
from services.common.export_buffer import Signal
from services.common.identity import Caller
from services.common.settings import Settings
from services.common.status import calling, from_rpc_error
from services.executor.delivery import (
    MAX_RETRY_WAIT_S,
    DeliveryState,
    Refused,
    TelemetryDelivery,
    Unreachable,
)
from services.executor.model import (
    AgentLogLine,
    FinishedTurn,
    Lease,
    LogOrigin,
    PackedBundle,
    RecordedTurn,
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
        if turn.request is not None:
            request.request_id = turn.request.request_id
            request.request_digest = turn.request.digest
            request.content_type = turn.request.content_type
            request.trace_id = turn.request.trace_id
        with calling("sessions"):
            state = await self._stub.CommitTurn(request, metadata=self.metadata(caller))
        return _state(state)

    async def lookup(
        self, caller: Caller, session: SessionRef, request_id: str, digest: str
    ) -> RecordedTurn | None:
        request = sessions_pb2.LookupTurnResultRequest(
            session=session.name, request_id=request_id, request_digest=digest
        )
        with calling("sessions"):
            found = await self._stub.LookupTurnResult(request, metadata=self.metadata(caller))
        if not found.HasField("result"):
            return None
        result = found.result
        return RecordedTurn(
            turn=result.turn, output=result.output, invocation_id=result.invocation_id,
            trace_id=result.trace_id,
        )


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


class TelemetrySpans:
    """The agent's own spans (already OTLP-encoded inside the sandbox), on their way to telemetry
    through the executor's delivery buffer."""

    def __init__(self, delivery: TelemetryDelivery, enabled: bool) -> None:
        self._delivery = delivery
        self.enabled = enabled

    def forward(self, encoded: bytes, trusted: Mapping[str, str]) -> None:
        """Sends the spans of one invocation, with `trusted` (agent, version, session, tenant...)
        stamped on their resource and removed from their own attributes: the spans come from
        untrusted code, which must not file them under another tenant or session."""
        if not (encoded and self.enabled):
            return
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
        self._delivery.offer_spans(request)


class LogsExport(Protocol):
    """The call of OTLP's LogsService that forwarding an agent's output makes."""

    def Export(
        self, request: logs_service_pb2.ExportLogsServiceRequest, *, timeout: float
    ) -> Awaitable[logs_service_pb2.ExportLogsServiceResponse]: ...


_logs_stub: Callable[[grpc.aio.Channel], LogsExport] = logs_service_pb2_grpc.LogsServiceStub
# The OpenTelemetry source attribute of a line: stdout, stderr or the Python logger's name.
LOG_SOURCE_ATTR = "corral.log.source"


class TelemetryLogs:
    """What an agent printed and logged, on its way to telemetry's LogsService through the
    executor's delivery buffer, as the executor, which telemetry trusts with the tenant, agent,
    version, session and invocation it stamps."""

    def __init__(self, delivery: TelemetryDelivery) -> None:
        self._delivery = delivery

    def forward(self, lines: Sequence[AgentLogLine], origin: LogOrigin) -> None:
        if lines:
            self._delivery.offer_logs(logs_request(lines, origin))


class _Report(Protocol):
    def ReportDelivery(
        self, request: telemetry_pb2.ReportDeliveryRequest, *, timeout: float
    ) -> Awaitable[telemetry_pb2.ReportDeliveryResponse]: ...


# What telemetry refuses for good: sending the same again cannot succeed. Anything else (down,
# overloaded, a credential it does not take yet) is tried again.
_REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED)


class TelemetryDeliverySink:
    """The delivery's calls to telemetry: OTLP exports (several batches of one signal merged into
    one request: serialized messages concatenate) and ReportDelivery."""

    def __init__(self, settings: Settings, timeout_s: float = 10) -> None:
        # Back within seconds of telemetry's return, not gRPC's default two minutes.
        self._channel = channel(settings, "telemetry", max_reconnect_backoff_s=MAX_RETRY_WAIT_S)
        self._traces = _trace_stub(self._channel)
        self._logs = _logs_stub(self._channel)
        report: Callable[[grpc.aio.Channel], _Report] = telemetry_pb2_grpc.TelemetryServiceStub
        self._report = report(self._channel)
        self._timeout_s = timeout_s

    async def export(self, signal: Signal, payloads: Sequence[bytes]) -> None:
        merged = b"".join(payloads)
        with _delivering():
            if signal is Signal.TRACES:
                spans = trace_service_pb2.ExportTraceServiceRequest.FromString(merged)
                await self._traces.Export(spans, timeout=self._timeout_s)
            else:
                logs = logs_service_pb2.ExportLogsServiceRequest.FromString(merged)
                await self._logs.Export(logs, timeout=self._timeout_s)

    async def report(self, state: DeliveryState) -> None:
        request = telemetry_pb2.ReportDeliveryRequest(exporter=state.exporter)
        if state.undelivered_since_ns is not None:
            request.undelivered_since.FromNanoseconds(state.undelivered_since_ns)
        for d in state.drops:
            if d.signal is Signal.TRACES:
                dropped = request.drops.add(count=d.count)
                dropped.start_time.FromNanoseconds(d.first_ns)
                dropped.end_time.FromNanoseconds(d.last_ns)
        with _delivering():
            await self._report.ReportDelivery(request, timeout=self._timeout_s)

    async def close(self) -> None:
        await self._channel.close()


@contextmanager
def _delivering() -> Iterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        if exc.code() in _REFUSED:
            raise Refused(f"{exc.code().name}: {exc.details()}") from None
        raise Unreachable(f"{exc.code().name}: {exc.details()}") from None
    except DecodeError as exc:
        raise Refused(f"not OTLP: {exc}") from None


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
