"""gRPC ↔ domain for OTLP's TraceService/Export and corral.telemetry.v1.TelemetryService."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf import struct_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from corral.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.identity import caller
from services.common.timestamps import optional_time, timestamp
from services.telemetry.spans import SpanFilter, SpanRow, Telemetry, TraceSummary, VersionMetrics

log = logging.getLogger(__name__)

_STATUS = {
    "OK": telemetry_pb2.SPAN_STATUS_OK,
    "ERROR": telemetry_pb2.SPAN_STATUS_ERROR,
}


def _filter(message: telemetry_pb2.SpanFilter) -> SpanFilter:
    return SpanFilter(
        agent=message.agent,
        version=message.version,
        endpoint=message.endpoint,
        session=message.session,
        trace_id=message.trace_id,
        start_time=optional_time(message, "start_time"),
        end_time=optional_time(message, "end_time"),
        errors_only=message.errors_only,
    )


def _span(row: SpanRow) -> telemetry_pb2.Span:
    attributes = struct_pb2.Struct()
    attributes.update(dict(row.attributes))
    return telemetry_pb2.Span(
        trace_id=row.trace_id,
        span_id=row.span_id,
        parent_span_id=row.parent_span_id,
        name=row.name,
        service=row.service,
        start_time=timestamp(row.start_time),
        end_time=timestamp(row.end_time),
        duration_ms=row.duration_ms,
        status=_STATUS.get(row.status, telemetry_pb2.SPAN_STATUS_UNSPECIFIED),
        status_message=row.status_message,
        agent=row.agent,
        version=row.version,
        endpoint=row.endpoint,
        session=row.session,
        tenant=row.tenant,
        attributes=attributes,
    )


def _trace(summary: TraceSummary) -> telemetry_pb2.TraceSummary:
    return telemetry_pb2.TraceSummary(
        trace_id=summary.trace_id,
        root_span_name=summary.root_span_name,
        start_time=timestamp(summary.start_time),
        duration_ms=summary.duration_ms,
        status=_STATUS.get(summary.status, telemetry_pb2.SPAN_STATUS_UNSPECIFIED),
        agent=summary.agent,
        version=summary.version,
        endpoint=summary.endpoint,
        session=summary.session,
        span_count=summary.span_count,
    )


def _metrics(m: VersionMetrics) -> telemetry_pb2.VersionMetrics:
    return telemetry_pb2.VersionMetrics(
        version=m.version,
        invocations=m.invocations,
        errors=m.errors,
        error_rate=m.error_rate,
        sessions=m.sessions,
        latency_p50_ms=m.latency_p50_ms,
        latency_p95_ms=m.latency_p95_ms,
        latency_p99_ms=m.latency_p99_ms,
        tool_calls=m.tool_calls,
        tool_failures=m.tool_failures,
        tool_failure_rate=m.tool_failure_rate,
        input_tokens=m.input_tokens,
        output_tokens=m.output_tokens,
        cost_usd=m.cost_usd,
        unpriced_models=m.unpriced_models,
    )


class TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    """OpenTelemetry's OTLP/gRPC trace receiver, so any OTel SDK or Collector can send here."""

    def __init__(self, telemetry: Telemetry, on_export: Any = None) -> None:
        self._telemetry = telemetry
        # Called with (request, tenant) after the spans are stored: scores carried as span events.
        self._on_export = on_export

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        tenant = caller(context).tenant
        result = await self._telemetry.export(request, default_tenant=tenant)
        if self._on_export is not None:
            await self._on_export(request, tenant)
        response = trace_service_pb2.ExportTraceServiceResponse()
        if result.rejected:
            response.partial_success.rejected_spans = result.rejected
            response.partial_success.error_message = result.reason
        return response


class TelemetryServicer(telemetry_pb2_grpc.TelemetryServiceServicer):
    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    async def ListSpans(
        self, request: telemetry_pb2.ListSpansRequest, context: grpc.aio.ServicerContext
    ) -> telemetry_pb2.ListSpansResponse:
        page = await self._telemetry.list_spans(
            caller(context).tenant, _filter(request.filter), request.page_size, request.page_token
        )
        return telemetry_pb2.ListSpansResponse(
            spans=[_span(row) for row in page.spans], next_page_token=page.next_page_token
        )

    async def ListTraces(
        self, request: telemetry_pb2.ListTracesRequest, context: grpc.aio.ServicerContext
    ) -> telemetry_pb2.ListTracesResponse:
        page = await self._telemetry.list_traces(
            caller(context).tenant, _filter(request.filter), request.page_size, request.page_token
        )
        return telemetry_pb2.ListTracesResponse(
            traces=[_trace(t) for t in page.traces], next_page_token=page.next_page_token
        )

    async def GetVersionMetrics(
        self, request: telemetry_pb2.GetVersionMetricsRequest, context: grpc.aio.ServicerContext
    ) -> telemetry_pb2.GetVersionMetricsResponse:
        metrics = await self._telemetry.version_metrics(
            caller(context).tenant,
            request.agent,
            optional_time(request, "start_time"),
            optional_time(request, "end_time"),
        )
        return telemetry_pb2.GetVersionMetricsResponse(versions=[_metrics(m) for m in metrics])
