"""The `telemetry` fixture: a real telemetry server on the run's PostgreSQL, and a client to it;
with the sessions service, which telemetry asks about sessions it has no spans of."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from corral.telemetry.v1.telemetry_pb2_grpc import TelemetryServiceStub
from tests import harness
from tests.credentials import internal_channel, public_channel
from tests.telemetry_client import Telemetry


@pytest_asyncio.fixture
async def telemetry(services: harness.Platform) -> AsyncIterator[Telemetry]:
    await services.start("telemetry", "sessions")
    channel = public_channel(services.settings.addrs["telemetry"])
    # Spans come from the platform: an executor exports them (trusted, unlike a user's export).
    executor = internal_channel(services.settings, "telemetry", "executor")
    registry = internal_channel(services.settings, "telemetry", "registry")
    yield Telemetry(
        services.settings,
        TelemetryServiceStub(channel),
        trace_service_pb2_grpc.TraceServiceStub(executor),
        channel,
        TelemetryServiceStub(registry),
    )
    for each in (channel, executor, registry):
        await each.close()
