"""The `telemetry` fixture: a real telemetry server on the run's PostgreSQL, and a client to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest_asyncio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from corral.telemetry.v1.telemetry_pb2_grpc import TelemetryServiceStub
from tests import harness
from tests.telemetry_client import Telemetry


@pytest_asyncio.fixture
async def telemetry(services: harness.Platform) -> AsyncIterator[Telemetry]:
    await services.start("telemetry")
    channel = grpc.aio.insecure_channel(services.settings.addrs["telemetry"])
    yield Telemetry(
        services.settings,
        TelemetryServiceStub(channel),
        trace_service_pb2_grpc.TraceServiceStub(channel),
        channel,
    )
    await channel.close()
