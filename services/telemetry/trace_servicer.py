"""OpenTelemetry's OTLP/gRPC trace receiver (TraceService/Export), so any OTel SDK or Collector
can send spans here: the export goes to the receiver every OTLP transport shares."""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from services.common.identity import caller
from services.common.interceptors import Context
from services.telemetry.receiver import SpanReceiver


class TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: SpanReceiver) -> None:
        self._receiver = receiver

    async def Export(
        self, request: ExportTraceServiceRequest, context: Context
    ) -> ExportTraceServiceResponse:
        return await self._receiver.export(request, caller(context), "grpc")
