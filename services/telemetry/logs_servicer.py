"""OpenTelemetry's OTLP/gRPC logs receiver (LogsService/Export), beside the trace receiver: the
executor exports what agents print and log here, and any OTel SDK or Collector may too. OTLP/HTTP's
`POST /v1/logs` (otlp_http.py) takes exports in through the same LogReceiver."""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsPartialSuccess,
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)

from services.common.auth.principal import Principal
from services.common.identity import caller
from services.common.interceptors import Context
from services.telemetry import otlp
from services.telemetry.forwarding import Export
from services.telemetry.logs import AgentLogs
from services.telemetry.otlp_logs import ingest_logs

GRPC = "grpc"


class LogReceiver:
    """The one way in for OTLP log exports, whatever the transport: the exporter's trust decided
    by otlp.Exporter.of, as for spans, and with CORRAL_OTLP_FORWARD offered to the forwarder."""

    def __init__(self, logs: AgentLogs, forward: Callable[[Export], None] | None = None) -> None:
        self._logs = logs
        # Takes what was stored to send on (forwarding.py: Forwarder.offer); must never block.
        self._forward = forward

    async def export(
        self, request: ExportLogsServiceRequest, exporter: Principal, transport: str
    ) -> ExportLogsServiceResponse:
        trust = otlp.Exporter.of(exporter)
        result = await ingest_logs(request, trust, self._logs)
        if self._forward is not None:
            self._forward(otlp.as_forwarded(request, trust))
        if not result.rejected:
            return ExportLogsServiceResponse()
        return ExportLogsServiceResponse(
            partial_success=ExportLogsPartialSuccess(
                rejected_log_records=result.rejected, error_message=result.reason
            )
        )


class LogsServicer(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: LogReceiver) -> None:
        self._receiver = receiver

    async def Export(
        self, request: ExportLogsServiceRequest, context: Context
    ) -> ExportLogsServiceResponse:
        return await self._receiver.export(request, caller(context), GRPC)
