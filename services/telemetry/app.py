"""Wires telemetry: pool and migrations → stores → domains → the OTLP receivers, the three
servicers on one server and OTLP over HTTP on a port of its own; the receiver's metrics in the
service's registry."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from corral.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.auth.interceptor import Authenticator
from services.common.clock import SystemClock
from services.common.db import create_pool, migrate
from services.common.outbound import OutboundPolicy
from services.common.server import App
from services.common.settings import Settings
from services.telemetry.clients import SessionsClient
from services.telemetry.delivery import Deliveries
from services.telemetry.evaluation import Evaluation
from services.telemetry.forward_sink import checked_sink
from services.telemetry.forwarding import Export, Forwarder
from services.telemetry.logs import AgentLogs
from services.telemetry.logs_servicer import LogReceiver, LogsServicer
from services.telemetry.metrics import TelemetryMetrics
from services.telemetry.otlp_http import OtlpHttp, logs, traces
from services.telemetry.receiver import SpanReceiver
from services.telemetry.servicer import TelemetryServicer
from services.telemetry.spans import Telemetry
from services.telemetry.store import PgDeliveryStore, PgLogStore, PgScoreStore, PgSpanStore
from services.telemetry.trace_servicer import TraceServicer

log = logging.getLogger(__name__)

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
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._authenticator: Authenticator | None = None

    def authenticated_by(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def start(self, server: grpc.aio.Server, stack: AsyncExitStack) -> list[str]:
        pool = await create_pool(self.settings.require_database(), self.settings.pools)
        stack.push_async_callback(pool.close)
        await migrate(pool, "telemetry", Path(__file__).parent / "migrations")
        spans, scores = PgSpanStore(pool), PgScoreStore(pool)
        sessions = SessionsClient(self.settings)
        stack.push_async_callback(sessions.close)
        telemetry = Telemetry(spans, scores, self.settings.model_prices)
        metrics = TelemetryMetrics(self.metrics)
        forward = await self._forwarder(metrics, stack)
        receiver = SpanReceiver(telemetry, metrics, forward)
        _add_trace_servicer(TraceServicer(receiver), server)
        agent_logs = AgentLogs(PgLogStore(pool))
        log_receiver = LogReceiver(agent_logs, forward)
        _add_logs_servicer(LogsServicer(log_receiver), server)
        deliveries = Deliveries(PgDeliveryStore(pool), SystemClock())
        evaluation = Evaluation(scores, spans, sessions, deliveries)
        telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(
            TelemetryServicer(telemetry, evaluation, agent_logs, deliveries), server
        )
        if self.settings.otlp_http_port:
            if self._authenticator is None:
                raise RuntimeError("OTLP/HTTP needs the host's authenticator (authenticated_by)")
            http = OtlpHttp([traces(receiver), logs(log_receiver)], self._authenticator, "0.0.0.0", self.settings.otlp_http_port)
            await http.start()
            stack.push_async_callback(http.close)
        return [TELEMETRY_SERVICE, TRACE_SERVICE, LOGS_SERVICE]


    async def _forwarder(
        self, metrics: TelemetryMetrics, stack: AsyncExitStack
    ) -> Callable[[Export], None] | None:
        """With CORRAL_OTLP_FORWARD, what the receiver offers every export to; its address checked
        by the outbound policy first (refused: telemetry does not start)."""
        forward = self.settings.otlp_forward
        if not forward.endpoint:
            return None
        sink = await checked_sink(forward, OutboundPolicy(self.settings.outbound_allow))
        forwarder = Forwarder(sink, metrics, forward.queue)
        forwarder.start()
        stack.push_async_callback(forwarder.close)
        log.info("forwarding every export to %s", sink.target)
        return forwarder.offer


def build(settings: Settings) -> TelemetryApp:
    return TelemetryApp(settings)
