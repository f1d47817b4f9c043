"""OpenTelemetry's OTLP/gRPC logs receiver (LogsService/Export), beside the trace receiver: the
executor exports what agents print and log here, and any OTel SDK or Collector may too."""

from __future__ import annotations

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsPartialSuccess,
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)

from services.common.identity import caller
from services.common.interceptors import Context
from services.telemetry import otlp
from services.telemetry.logs import AgentLogs
from services.telemetry.otlp_logs import ingest_logs


class LogsServicer(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, logs: AgentLogs) -> None:
        self._logs = logs

    async def Export(
        self, request: ExportLogsServiceRequest, context: Context
    ) -> ExportLogsServiceResponse:
        result = await ingest_logs(request, otlp.Exporter.of(caller(context)), self._logs)
        if not result.rejected:
            return ExportLogsServiceResponse()
        return ExportLogsServiceResponse(
            partial_success=ExportLogsPartialSuccess(
                rejected_log_records=result.rejected, error_message=result.reason
            )
        )
