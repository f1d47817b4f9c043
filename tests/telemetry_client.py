"""Telemetry as its tests talk to it: TelemetryService as a user, the OTLP TraceService as an
executor, and ids of a test's own (the database is shared by the run)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from corral.telemetry.v1.telemetry_pb2_grpc import TelemetryServiceStub
from services.common.settings import Settings


@dataclass
class Telemetry:
    settings: Settings
    api: TelemetryServiceStub
    otlp: trace_service_pb2_grpc.TraceServiceStub
    channel: grpc.aio.Channel


def uid() -> str:
    """An id for a tenant, agent or session of a test's own."""
    return uuid.uuid4().hex[:10]
