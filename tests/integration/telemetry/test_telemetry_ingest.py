"""Telemetry against a real server and PostgreSQL: spans sent by the OpenTelemetry SDK over
OTLP and found again, one tenant at a time; malformed spans rejected; both services healthy."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, StatusCode

from corral.telemetry.v1 import telemetry_pb2 as pb
from services.common.auth.pki import load_identity
from services.common.settings import Settings
from tests.otlp import corral_attributes, export_request, invocation, otlp_span
from tests.rpc import who
from tests.telemetry_client import Telemetry, uid

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def sdk_export(settings: Settings, emit: object, resource: dict[str, str] | None = None) -> None:
    """Runs `emit(tracer)` with the real SDK and OTLP exporter, exporting as an executor does (to
    telemetry's internal listener, with the executor's certificate). The exporter blocks, so this
    runs in a thread while the server answers on the test's event loop."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": "corral-executor", **(resource or {})})
    )
    executor = load_identity(settings.pki_dir, "executor")
    provider.add_span_processor(
        SimpleSpanProcessor(
            OTLPSpanExporter(
                endpoint=settings.internal_addrs["telemetry"],
                credentials=executor.channel_credentials(), timeout=10,
            )
        )
    )
    try:
        emit(provider.get_tracer("corral.executor"))  # type: ignore[operator]
    finally:
        provider.shutdown()


async def test_sdk_spans_found_by_version_session_endpoint_and_trace(telemetry: Telemetry) -> None:
    tenant, agent = f"acme-{uid()}", f"agents/progress-report-{uid()}"
    first, second = f"sessions/{uid()}", f"sessions/{uid()}"
    trace_ids: dict[str, str] = {}

    def emit(tracer) -> None:  # type: ignore[no-untyped-def]
        attrs = corral_attributes(agent, 2, "prod", first, tenant)
        with tracer.start_as_current_span(
            "invoke_agent progress-report",
            kind=SpanKind.SERVER,
            attributes={
                **attrs,
                "gen_ai.operation.name": "invoke_agent",
                "corral.invocation": "inv-1",
            },
        ) as root:
            trace_ids["first"] = format(root.get_span_context().trace_id, "032x")
            with tracer.start_as_current_span(
                "chat scripted-1", attributes={**attrs, "gen_ai.usage.output_tokens": 42}
            ):
                pass
            with tracer.start_as_current_span(
                "execute_tool session_data", attributes=attrs
            ) as tool:
                tool.set_status(StatusCode.ERROR, "tool timed out")
        attrs = corral_attributes(agent, 1, "staging", second, tenant)
        with tracer.start_as_current_span(
            "invoke_agent progress-report",
            attributes={**attrs, "gen_ai.operation.name": "invoke_agent"},
        ) as root:
            trace_ids["second"] = format(root.get_span_context().trace_id, "032x")

    await asyncio.to_thread(sdk_export, telemetry.settings, emit)
    md = who(tenant, user="")

    by_version = await telemetry.api.ListSpans(
        pb.ListSpansRequest(filter=pb.SpanFilter(version=f"{agent}/versions/2")), metadata=md
    )
    spans = {s.name: s for s in by_version.spans}
    assert set(spans) == {
        "invoke_agent progress-report",
        "chat scripted-1",
        "execute_tool session_data",
    }
    starts = [s.start_time.ToNanoseconds() for s in by_version.spans]
    assert starts == sorted(starts, reverse=True), "newest first"
    root, chat, tool = (
        spans["invoke_agent progress-report"],
        spans["chat scripted-1"],
        spans["execute_tool session_data"],
    )
    assert (
        root.trace_id == trace_ids["first"]
        and len(root.span_id) == 16
        and root.parent_span_id == ""
    )
    assert chat.parent_span_id == tool.parent_span_id == root.span_id
    assert (root.agent, root.endpoint, root.session, root.tenant) == (
        agent,
        f"{agent}/endpoints/prod",
        first,
        tenant,
    )
    assert root.service == "corral-executor"
    assert root.attributes["corral.invocation"] == "inv-1"
    assert chat.attributes["gen_ai.usage.output_tokens"] == 42
    assert tool.status == pb.SPAN_STATUS_ERROR and tool.status_message == "tool timed out"
    assert root.status == pb.SPAN_STATUS_UNSPECIFIED
    assert root.duration_ms >= chat.duration_ms > 0

    by_session = await telemetry.api.ListSpans(
        pb.ListSpansRequest(filter=pb.SpanFilter(session=second)), metadata=md
    )
    assert [s.trace_id for s in by_session.spans] == [trace_ids["second"]]

    errors = await telemetry.api.ListSpans(
        pb.ListSpansRequest(filter=pb.SpanFilter(agent=agent, errors_only=True)), metadata=md
    )
    assert [s.name for s in errors.spans] == ["execute_tool session_data"]

    by_trace = await telemetry.api.ListSpans(
        pb.ListSpansRequest(filter=pb.SpanFilter(trace_id=trace_ids["first"].upper())), metadata=md
    )
    assert len(by_trace.spans) == 3

    prod = await telemetry.api.ListTraces(
        pb.ListTracesRequest(filter=pb.SpanFilter(endpoint=f"{agent}/endpoints/prod")), metadata=md
    )
    assert len(prod.traces) == 1
    summary = prod.traces[0]
    assert summary.trace_id == trace_ids["first"]
    assert summary.root_span_name == "invoke_agent progress-report"
    assert summary.span_count == 3
    assert (summary.version, summary.session) == (f"{agent}/versions/2", first)
    assert summary.duration_ms == pytest.approx(root.duration_ms)
    assert summary.start_time == root.start_time

    both = await telemetry.api.ListTraces(
        pb.ListTracesRequest(filter=pb.SpanFilter(agent=agent)), metadata=md
    )
    assert [t.trace_id for t in both.traces] == [trace_ids["second"], trace_ids["first"]]
    assert [t.span_count for t in both.traces] == [1, 3]


async def test_tenants_never_see_each_others_spans(telemetry: Telemetry) -> None:
    tenant_a, tenant_b, agent = f"a-{uid()}", f"b-{uid()}", f"agents/shared-{uid()}"
    trace_ids: list[str] = []

    def emit(tracer) -> None:  # type: ignore[no-untyped-def]
        with tracer.start_as_current_span(
            "invoke_agent shared",
            attributes={
                "gen_ai.operation.name": "invoke_agent",
                "corral.agent": agent,
                "corral.version": f"{agent}/versions/1",
                "corral.session": "sessions/s1",
            },
        ) as span:
            trace_ids.append(format(span.get_span_context().trace_id, "032x"))

    # The tenant travels on the resource here: spans fall back to it.
    await asyncio.to_thread(sdk_export, telemetry.settings, emit, {"corral.tenant": tenant_a})
    window = pb.SpanFilter(agent=agent)

    for md, expected in ((who(tenant_a, user=""), 1), (who(tenant_b, user=""), 0), ((), 0)):
        spans = await telemetry.api.ListSpans(pb.ListSpansRequest(filter=window), metadata=md)
        assert len(spans.spans) == expected
        by_id = await telemetry.api.ListSpans(
            pb.ListSpansRequest(filter=pb.SpanFilter(trace_id=trace_ids[0])), metadata=md
        )
        assert len(by_id.spans) == expected
        traces = await telemetry.api.ListTraces(pb.ListTracesRequest(filter=window), metadata=md)
        assert len(traces.traces) == expected
        metrics = await telemetry.api.GetVersionMetrics(
            pb.GetVersionMetricsRequest(agent=agent), metadata=md
        )
        assert [m.invocations for m in metrics.versions] == ([1] if expected else [])

    everything_b = await telemetry.api.ListSpans(
        pb.ListSpansRequest(page_size=1000), metadata=who(tenant_b, user="")
    )
    assert everything_b.spans == []


async def test_export_rejects_malformed_spans_and_keeps_the_rest(telemetry: Telemetry) -> None:
    tenant = f"r-{uid()}"
    good = otlp_span(
        int(uuid.uuid4().int >> 64), 1, 0, 5, invocation("agents/r", 1, "sessions/r", tenant)
    )
    bad = Span(trace_id=b"short", span_id=b"12345678", name="broken")
    response = await telemetry.otlp.Export(export_request([good, bad]))
    assert response.partial_success.rejected_spans == 1
    assert "trace_id" in response.partial_success.error_message
    found = await telemetry.api.ListSpans(pb.ListSpansRequest(), metadata=who(tenant, user=""))
    assert [s.span_id for s in found.spans] == [good.span_id.hex()]


async def test_both_services_are_registered_and_healthy(telemetry: Telemetry) -> None:
    health = health_pb2_grpc.HealthStub(telemetry.channel)
    for name in (
        "corral.telemetry.v1.TelemetryService",
        "opentelemetry.proto.collector.trace.v1.TraceService",
    ):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
