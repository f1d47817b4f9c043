"""CORRAL_OTLP_FORWARD against a real telemetry server and a real second OTLP receiver (a gRPC
TraceService and LogsService in the test): everything telemetry accepts, spans and log records,
goes on, with the forwarding headers; a user's spans and records say the tenant they were stored
under; a backend that lags or is down costs
dropped, counted spans and never the exporter's call; the outbound policy checks the target at
start."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from services.common.server import ServiceHost
from services.common.settings import Settings, SettingsError
from tests import harness
from tests.credentials import internal_channel, public_channel
from tests.otlp import export_request, invocation, logs_request, otlp_span
from tests.rpc import who
from tests.telemetry_client import uid

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    async def Export(self, request: ExportLogsServiceRequest, context: object) -> ExportLogsServiceResponse:
        self._backend.logs.append(request)
        return ExportLogsServiceResponse()


@dataclass
class Backend(trace_service_pb2_grpc.TraceServiceServicer):
    """Another OTLP receiver (a team's Collector or Jaeger), holding what it received."""

    received: list[tuple[ExportTraceServiceRequest, dict[str, str]]] = field(default_factory=list)
    logs: list[ExportLogsServiceRequest] = field(default_factory=list)
    # Cleared: every Export waits until it is set again (a backend that lags).
    answering: asyncio.Event = field(default_factory=asyncio.Event)
    address: str = ""
    server: grpc.aio.Server | None = None

    async def Export(self, request: ExportTraceServiceRequest, context: object) -> ExportTraceServiceResponse:
        await self.answering.wait()
        self.received.append((request, dict(context.invocation_metadata() or ())))  # type: ignore[attr-defined]
        return ExportTraceServiceResponse()

    async def start(self) -> None:
        self.answering.set()
        self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)  # type: ignore[no-untyped-call]
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(self), self.server)  # type: ignore[no-untyped-call]
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()

    async def spans(self, count: int) -> list[tuple[str, dict[str, str], dict[str, str]]]:
        """(trace id, resource attributes, span attributes) of the first `count` spans received."""
        async with asyncio.timeout(10):
            while sum(len(s.spans) for r, _ in self.received for rs in r.resource_spans
                      for s in rs.scope_spans) < count:
                await asyncio.sleep(0.02)
        return [
            (span.trace_id.hex(), {kv.key: kv.value.string_value for kv in rs.resource.attributes},
             {kv.key: kv.value.string_value for kv in span.attributes})
            for request, _ in self.received for rs in request.resource_spans
            for scope in rs.scope_spans for span in scope.spans
        ]


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    await b.start()
    yield b
    b.answering.set()
    assert b.server is not None
    await b.server.stop(0)


@dataclass
class Forwarding:
    host: ServiceHost
    settings: Settings

    def count(self, name: str, **labels: str) -> float:
        registry = self.host.service.metrics_registry()
        assert registry is not None
        return registry.get_sample_value(name, labels) or 0.0

    async def export_as_executor(self, request: ExportTraceServiceRequest) -> None:
        channel = internal_channel(self.settings, "telemetry", "executor")
        try:
            await trace_service_pb2_grpc.TraceServiceStub(channel).Export(request, timeout=5)  # type: ignore[no-untyped-call]
        finally:
            await channel.close()

    async def export_logs(self, request: ExportLogsServiceRequest, tenant: str = "") -> None:
        """As the executor, or as a user of `tenant` when one is named."""
        channel = (public_channel(self.settings.addrs["telemetry"]) if tenant
                   else internal_channel(self.settings, "telemetry", "executor"))
        try:
            stub = logs_service_pb2_grpc.LogsServiceStub(channel)  # type: ignore[no-untyped-call]
            metadata = who(tenant, user="", role="operator") if tenant else ()
            await stub.Export(request, metadata=metadata, timeout=5)
        finally:
            await channel.close()

    async def export_as_user(self, request: ExportTraceServiceRequest, tenant: str) -> None:
        channel = public_channel(self.settings.addrs["telemetry"])
        try:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)  # type: ignore[no-untyped-call]
            await stub.Export(request, metadata=who(tenant, user="", role="operator"), timeout=5)
        finally:
            await channel.close()


async def telemetry_forwarding(settings: Settings, tmp_path: Path, **env: str) -> tuple[harness.Platform, Forwarding]:
    s = harness.make_settings(settings.database_url or "", settings.redis_url or "", tmp_path, **env)
    platform = harness.Platform(s)
    try:
        hosts = await platform.start("telemetry")
    except BaseException:
        await platform.stop()
        raise
    return platform, Forwarding(hosts["telemetry"], platform.settings)


@pytest_asyncio.fixture
async def started() -> AsyncIterator[list[harness.Platform]]:
    """Platforms a test started, stopped when it ends."""
    platforms: list[harness.Platform] = []
    yield platforms
    for platform in platforms:
        await platform.stop()


def one_span(tenant: str, extra: dict[str, str] | None = None) -> ExportTraceServiceRequest:
    attrs = {**invocation(f"agents/fw-{uid()}", 1, f"sessions/{uid()}", tenant), **(extra or {})}
    return export_request([otlp_span(uuid.uuid4().int >> 1, 1, 0, 5, attrs)])


async def test_every_export_goes_on_with_the_headers_and_the_tenant_it_was_stored_under(
    settings: Settings, tmp_path: Path, backend: Backend, started: list[harness.Platform],
) -> None:
    platform, telemetry = await telemetry_forwarding(
        settings, tmp_path, CORRAL_OTLP_FORWARD=backend.address,
        CORRAL_OTLP_FORWARD_HEADERS="x-api-key=s3cr%3Dt,x-team=obs")
    started.append(platform)
    platform_tenant, user_tenant = f"p-{uid()}", f"u-{uid()}"
    mine = one_span(platform_tenant)
    theirs = one_span("someone-else")  # a user's span claiming another tenant
    await telemetry.export_as_executor(mine)
    await telemetry.export_as_user(theirs, user_tenant)

    spans = {trace: (resource, attrs) for trace, resource, attrs in await backend.spans(2)}
    platform_span = mine.resource_spans[0].scope_spans[0].spans[0]
    assert spans[platform_span.trace_id.hex()][1]["corral.tenant"] == platform_tenant
    user_span = theirs.resource_spans[0].scope_spans[0].spans[0]
    resource, attrs = spans[user_span.trace_id.hex()]
    assert resource["corral.tenant"] == user_tenant and "corral.tenant" not in attrs
    assert {k: v for k, v in backend.received[0][1].items() if k.startswith("x-")} == {
        "x-api-key": "s3cr=t", "x-team": "obs"}
    assert telemetry.count("corral_otlp_forwarded_spans_total") == 2


async def test_log_records_go_on_too_a_users_saying_the_tenant_they_were_stored_under(
    settings: Settings, tmp_path: Path, backend: Backend, started: list[harness.Platform],
) -> None:
    platform, telemetry = await telemetry_forwarding(
        settings, tmp_path, CORRAL_OTLP_FORWARD=backend.address)
    started.append(platform)
    platform_tenant, user_tenant = f"p-{uid()}", f"u-{uid()}"
    await telemetry.export_logs(
        logs_request(platform_tenant, f"agents/fw-{uid()}", uid(), "from the agent", "and more"))
    await telemetry.export_logs(
        logs_request("someone-else", f"agents/fw-{uid()}", uid(), "a user's line"), user_tenant)

    async with asyncio.timeout(10):
        while telemetry.count("corral_otlp_forwarded_log_records_total") < 3:
            await asyncio.sleep(0.02)
    forwarded = {
        record.body.string_value: {kv.key: kv.value.string_value for kv in rl.resource.attributes}
        for request in backend.logs for rl in request.resource_logs
        for scope in rl.scope_logs for record in scope.log_records
    }
    assert set(forwarded) == {"from the agent", "and more", "a user's line"}
    assert forwarded["from the agent"]["corral.tenant"] == platform_tenant
    assert forwarded["a user's line"]["corral.tenant"] == user_tenant


async def test_a_lagging_backend_costs_dropped_spans_never_the_exporters_call(
    settings: Settings, tmp_path: Path, backend: Backend, started: list[harness.Platform],
) -> None:
    platform, telemetry = await telemetry_forwarding(
        settings, tmp_path, CORRAL_OTLP_FORWARD=f"http://{backend.address}",
        CORRAL_OTLP_FORWARD_QUEUE="1")
    started.append(platform)
    backend.answering.clear()
    tenant = f"p-{uid()}"
    # One export is out (the backend holds it), one waits in the queue, the rest are dropped:
    # each exporter's call returns at once all the same.
    async with asyncio.timeout(5):
        for _ in range(5):
            await telemetry.export_as_executor(one_span(tenant))
    assert telemetry.count("corral_otlp_forward_dropped_spans_total", reason="queue_full") == 3
    backend.answering.set()
    assert len(await backend.spans(2)) == 2
    async with asyncio.timeout(5):
        while telemetry.count("corral_otlp_forwarded_spans_total") < 2:
            await asyncio.sleep(0.02)


async def test_a_backend_that_is_down_costs_counted_spans(
    settings: Settings, tmp_path: Path, started: list[harness.Platform],
    caplog: pytest.LogCaptureFixture,
) -> None:
    platform, telemetry = await telemetry_forwarding(
        settings, tmp_path, CORRAL_OTLP_FORWARD=harness.refused_address())
    started.append(platform)
    await telemetry.export_as_executor(one_span(f"p-{uid()}"))
    async with asyncio.timeout(15):
        while telemetry.count("corral_otlp_forward_dropped_spans_total", reason="send_failed") < 1:
            await asyncio.sleep(0.05)
    assert any("not forwarded" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("endpoint", "says"), [
    ("127.0.0.1:4317", "CORRAL_OUTBOUND_ALLOW"),  # loopback, not allowed here
    ("10.1.2.3:4317", "CORRAL_OUTBOUND_ALLOW"),
    ("ftp://collector:21", "http"),
    ("https://collector.example.com/v1/traces", "name the port"),
    ("unix:/tmp/otlp.sock", "not supported"),
])
async def test_the_outbound_policy_checks_the_target_at_start(
    settings: Settings, tmp_path: Path, endpoint: str, says: str,
) -> None:
    with pytest.raises(SettingsError, match="CORRAL_OTLP_FORWARD") as refused:
        await telemetry_forwarding(settings, tmp_path, CORRAL_OTLP_FORWARD=endpoint,
                                   CORRAL_TOOLS_ALLOW_LOOPBACK="false")
    assert says in str(refused.value)
