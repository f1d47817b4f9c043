"""The one way into telemetry for OTLP, whichever transport carried the export (gRPC
TraceService/Export, HTTP POST /v1/traces): the exporter's trust (otlp.Exporter.of), the spans
stored, the export counted and, with CORRAL_OTLP_FORWARD, offered to the forwarder."""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from services.common.auth.principal import Principal
from services.telemetry import otlp
from services.telemetry.forwarding import Export
from services.telemetry.metrics import TelemetryMetrics
from services.telemetry.spans import Telemetry


class SpanReceiver:
    def __init__(
        self, telemetry: Telemetry, metrics: TelemetryMetrics,
        forward: Callable[[Export], None] | None = None,
    ) -> None:
        self._telemetry = telemetry
        self._metrics = metrics
        # Takes what was stored to send on (forwarding.py: Forwarder.offer); must never block.
        self._forward = forward

    async def export(
        self, request: ExportTraceServiceRequest, exporter: Principal, transport: str
    ) -> ExportTraceServiceResponse:
        """Stores what `exporter` sent over `transport`; the answer OTLP expects (partial
        success naming the spans refused)."""
        trust = otlp.Exporter.of(exporter)
        result = await self._telemetry.export(otlp.export_batch(request, trust))
        self._metrics.exported(transport, result)
        if self._forward is not None:
            self._forward(otlp.as_forwarded(request, trust))
        if not result.rejected:
            return ExportTraceServiceResponse()
        return ExportTraceServiceResponse(
            partial_success=ExportTracePartialSuccess(
                rejected_spans=result.rejected, error_message=result.reason
            )
        )
