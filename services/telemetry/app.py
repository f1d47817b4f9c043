"""Wires telemetry: pool and migrations → store → domain → the two servicers on one server."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from corral.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.db import create_pool, migrate
from services.common.prometheus import MetricsExporter
from services.common.server import Service
from services.common.settings import Settings
from services.telemetry.evaluation import Evaluation
from services.telemetry.evaluation_servicer import EvaluationServicer
from services.telemetry.evaluation_store import EvaluationStore
from services.telemetry.prometheus import version_snapshot
from services.telemetry.servicer import TraceServicer
from services.telemetry.spans import Telemetry
from services.telemetry.store import PgSpanStore

TRACE_SERVICE = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name
TELEMETRY_SERVICE = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name


class TelemetryApp(Service):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    async def start(self, server: grpc.aio.Server, stack: AsyncExitStack) -> list[str]:
        pool = await create_pool(self._settings.require_database())
        stack.push_async_callback(pool.close)
        await migrate(pool, "telemetry", Path(__file__).parent / "migrations")
        telemetry = Telemetry(PgSpanStore(pool), self._settings.model_prices)
        evaluation = Evaluation(EvaluationStore(pool))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
            TraceServicer(telemetry, evaluation.record_exported_scores), server
        )
        telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(
            EvaluationServicer(telemetry, evaluation), server
        )
        exporter = MetricsExporter(self._settings.metrics_ports["telemetry"], version_snapshot(pool))
        exporter.start()
        stack.push_async_callback(exporter.stop)
        return [TELEMETRY_SERVICE, TRACE_SERVICE]


def build(settings: Settings) -> TelemetryApp:
    return TelemetryApp(settings)
