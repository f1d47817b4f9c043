"""Wires telemetry: pool and migrations → stores → domains → the three servicers on one server, and
the Prometheus exporter over the fleet's figures."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from corral.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.db import create_pool, migrate
from services.common.prometheus import MetricsExporter
from services.common.server import App
from services.common.settings import Settings
from services.telemetry.evaluation import Evaluation
from services.telemetry.logs import AgentLogs
from services.telemetry.logs_servicer import LogsServicer
from services.telemetry.prometheus import version_snapshot
from services.telemetry.servicer import TelemetryServicer
from services.telemetry.spans import Telemetry
from services.telemetry.store import PgFleetMetrics, PgLogStore, PgScoreStore, PgSpanStore
from services.telemetry.trace_servicer import TraceServicer

# opentelemetry-proto ships its *_pb2_grpc modules without annotations: typed here, once.
_add_trace_servicer: Callable[[TraceServicer, grpc.aio.Server], None] = (
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server
)
_add_logs_servicer: Callable[[LogsServicer, grpc.aio.Server], None] = (
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server
)
LOGS_SERVICE = logs_service_pb2.DESCRIPTOR.services_by_name["LogsService"].full_name
TRACE_SERVICE = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name
TELEMETRY_SERVICE = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name


class TelemetryApp(App):
    async def start(self, server: grpc.aio.Server, stack: AsyncExitStack) -> list[str]:
        pool = await create_pool(self.settings.require_database())
        stack.push_async_callback(pool.close)
        await migrate(pool, "telemetry", Path(__file__).parent / "migrations")
        spans, scores = PgSpanStore(pool), PgScoreStore(pool)
        telemetry = Telemetry(spans, scores, self.settings.model_prices)
        logs = AgentLogs(PgLogStore(pool))
        _add_trace_servicer(TraceServicer(telemetry), server)
        _add_logs_servicer(LogsServicer(logs), server)
        telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(
            TelemetryServicer(telemetry, Evaluation(scores, spans), logs), server
        )
        exporter = MetricsExporter(
            self.settings.metrics_ports["telemetry"], version_snapshot(PgFleetMetrics(pool))
        )
        exporter.start()
        stack.push_async_callback(exporter.stop)
        return [TELEMETRY_SERVICE, TRACE_SERVICE, LOGS_SERVICE]


def build(settings: Settings) -> TelemetryApp:
    return TelemetryApp(settings)
