"""Spans and log records as an OpenTelemetry exporter sends them to telemetry: attributes, spans of
an agent's invocations built by hand, the ExportTraceServiceRequest that carries a batch of spans
and their resource, and an ExportLogsServiceRequest of an invocation's lines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

# otlp_span places spans by milliseconds after T0.
T0 = 1_750_000_000_000_000_000  # nanoseconds since the epoch
MS = 1_000_000


def kv(key: str, value: AnyValue | str) -> KeyValue:
    """An attribute; a str is a string value."""
    return KeyValue(
        key=key, value=AnyValue(string_value=value) if isinstance(value, str) else value
    )


def attributes(values: Mapping[str, str]) -> list[KeyValue]:
    """String attributes, in the order given."""
    return [kv(key, value) for key, value in values.items()]


def export_request(
    spans: Sequence[Span], resource: Sequence[KeyValue] = ()
) -> ExportTraceServiceRequest:
    """One batch of `spans`, under a resource with `resource` attributes."""
    batch = ResourceSpans(
        resource=Resource(attributes=list(resource)), scope_spans=[ScopeSpans(spans=list(spans))]
    )
    return ExportTraceServiceRequest(resource_spans=[batch])


def corral_attributes(
    agent: str, n: int, endpoint: str, session: str, tenant: str
) -> dict[str, str]:
    """The corral.* attributes saying where a span ran: version `n` of `agent`, through
    `endpoint`, in `session`, for `tenant`."""
    return {
        "corral.agent": agent,
        "corral.version": f"{agent}/versions/{n}",
        "corral.endpoint": f"{agent}/endpoints/{endpoint}",
        "corral.session": session,
        "corral.tenant": tenant,
    }


def otlp_span(
    trace: int,
    span: int,
    start_ms: float,
    duration_ms: float,
    attrs: dict[str, str],
    *,
    error: bool = False,
    parent: int = 0,
) -> Span:
    """Span `span` of trace `trace` (its ids as numbers), starting `start_ms` after T0; a "name"
    in `attrs` is the span's name, the rest are its attributes."""
    start = T0 + int(start_ms * MS)
    return Span(
        trace_id=trace.to_bytes(16, "big"),
        span_id=span.to_bytes(8, "big"),
        parent_span_id=parent.to_bytes(8, "big") if parent else b"",
        name=attrs.get("name", "invoke_agent progress-report"),
        start_time_unix_nano=start,
        end_time_unix_nano=start + int(duration_ms * MS),
        status=Status(code=Status.STATUS_CODE_ERROR if error else Status.STATUS_CODE_UNSET),
        attributes=attributes({k: v for k, v in attrs.items() if k != "name"}),
    )


def invocation(agent: str, n: int, session: str, tenant: str) -> dict[str, str]:
    """The attributes of the `invoke_agent` span of one turn of version `n`, through prod."""
    return {
        **corral_attributes(agent, n, "prod", session, tenant),
        "gen_ai.operation.name": "invoke_agent",
    }


def logs_request(tenant: str, agent: str, invocation_id: str, *bodies: str) -> ExportLogsServiceRequest:
    """One batch of stdout lines `bodies` of an invocation of version 1 of `agent` (its name in
    full) in session `sessions/s`, its resource naming `tenant`, as the executor exports them."""
    resource = Resource(attributes=attributes({
        "corral.tenant": tenant, "corral.agent": agent, "corral.version": f"{agent}/versions/1",
        "corral.session": "sessions/s", "corral.invocation": invocation_id}))
    records = [LogRecord(time_unix_nano=T0 + i, body=AnyValue(string_value=body),
                         severity_text="INFO", attributes=[kv("corral.log.source", "stdout")])
               for i, body in enumerate(bodies)]
    return ExportLogsServiceRequest(resource_logs=[
        ResourceLogs(resource=resource, scope_logs=[ScopeLogs(log_records=records)])])
