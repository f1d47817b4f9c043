"""OpenTelemetry's OTLP/gRPC trace receiver (TraceService/Export), so any OTel SDK or Collector
can send spans here: the export becomes rows and scores (otlp.py) that the span domain stores."""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from services.common.identity import caller
from services.common.interceptors import Context
from services.telemetry import otlp
from services.telemetry.spans import Telemetry


class TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    async def Export(
        self, request: ExportTraceServiceRequest, context: Context
    ) -> ExportTraceServiceResponse:
        batch = otlp.export_batch(request, otlp.Exporter.of(caller(context)))
        result = await self._telemetry.export(batch)
        if not result.rejected:
            return ExportTraceServiceResponse()
        return ExportTraceServiceResponse(
            partial_success=ExportTracePartialSuccess(
                rejected_spans=result.rejected, error_message=result.reason
            )
        )
