"""Spans as an OpenTelemetry exporter sends them to telemetry: attributes, and the
ExportTraceServiceRequest that carries a batch of spans and their resource."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span


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
