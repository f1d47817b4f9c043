"""The one way into telemetry for OTLP, whichever transport carried the export (gRPC
TraceService/Export, HTTP POST /v1/traces): the exporter's trust (otlp.Exporter.of), the spans
stored, the export counted."""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from services.common.auth.principal import Principal
from services.telemetry import otlp
from services.telemetry.metrics import TelemetryMetrics
from services.telemetry.spans import Telemetry


class SpanReceiver:
    def __init__(self, telemetry: Telemetry, metrics: TelemetryMetrics) -> None:
        self._telemetry = telemetry
        self._metrics = metrics

    async def export(
        self, request: ExportTraceServiceRequest, exporter: Principal, transport: str
    ) -> ExportTraceServiceResponse:
        """Stores what `exporter` sent over `transport`; the answer OTLP expects (partial
        success naming the spans refused)."""
        batch = otlp.export_batch(request, otlp.Exporter.of(exporter))
        result = await self._telemetry.export(batch)
        self._metrics.exported(transport, result)
        if not result.rejected:
            return ExportTraceServiceResponse()
        return ExportTraceServiceResponse(
            partial_success=ExportTracePartialSuccess(
                rejected_spans=result.rejected, error_message=result.reason
            )
        )
