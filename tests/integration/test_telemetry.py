"""Telemetry against a real server and PostgreSQL: spans sent by the OpenTelemetry SDK over OTLP,
then found, summarised and measured through TelemetryService, one tenant at a time."""

from __future__ import annotations

import asyncio
import json
import statistics
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, StatusCode

from corral.telemetry.v1 import telemetry_pb2 as pb
from corral.telemetry.v1.telemetry_pb2_grpc import TelemetryServiceStub
from services.common.settings import Settings
from tests import harness
from tests.otlp import attributes, export_request
from tests.rpc import error_details, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

T0 = 1_750_000_000_000_000_000  # nanoseconds since the epoch
MS = 1_000_000


@dataclass
class Telemetry:
    settings: Settings
    api: TelemetryServiceStub
    otlp: trace_service_pb2_grpc.TraceServiceStub
    channel: grpc.aio.Channel


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


def uid() -> str:
    return uuid.uuid4().hex[:10]


def corral_attributes(
    agent: str, n: int, endpoint: str, session: str, tenant: str
) -> dict[str, str]:
    return {
        "corral.agent": agent,
        "corral.version": f"{agent}/versions/{n}",
        "corral.endpoint": f"{agent}/endpoints/{endpoint}",
        "corral.session": session,
        "corral.tenant": tenant,
    }


def sdk_export(settings: Settings, emit: object, resource: dict[str, str] | None = None) -> None:
    """Runs `emit(tracer)` with the real SDK and OTLP exporter. The exporter blocks, so this runs in
    a thread while the server answers on the test's event loop."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": "corral-executor", **(resource or {})})
    )
    provider.add_span_processor(
        SimpleSpanProcessor(
            OTLPSpanExporter(endpoint=settings.addrs["telemetry"], insecure=True, timeout=10)
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


def otlp_span(
    trace: int,
    span: int,
    start_ms: float,
    duration_ms: float,
    attrs: dict[str, str],
    *,
    error: bool = False,
    parent: int = 0,
) -> Span:
    start = T0 + int(start_ms * MS)
    return Span(
        trace_id=trace.to_bytes(16, "big"),
        span_id=span.to_bytes(8, "big"),
        parent_span_id=parent.to_bytes(8, "big") if parent else b"",
        name=attrs.get("name", "invoke_agent progress-report"),
        start_time_unix_nano=start,
        end_time_unix_nano=start + int(duration_ms * MS),
        status=Status(code=Status.STATUS_CODE_ERROR if error else Status.STATUS_CODE_UNSET),
        attributes=attributes({k: v for k, v in attrs.items() if k != "name"}),
    )


def invocation(agent: str, n: int, session: str, tenant: str) -> dict[str, str]:
    return {
        **corral_attributes(agent, n, "prod", session, tenant),
        "gen_ai.operation.name": "invoke_agent",
    }


def timestamp(offset_ms: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(T0 + int(offset_ms * MS))
    return stamp


async def test_version_metrics_by_hand_and_not_double_counted(telemetry: Telemetry) -> None:
    tenant, agent = f"m-{uid()}", f"agents/metrics-{uid()}"
    base = int(uuid.uuid4().int >> 64) << 32  # trace ids unique to this test
    durations = [5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 250]
    spans = []
    for i, duration in enumerate(durations):
        spans.append(
            otlp_span(
                base + i,
                1,
                start_ms=1000 + i,
                duration_ms=duration,
                attrs=invocation(agent, 1, f"sessions/s{i % 4}", tenant),
                error=i in (3, 17),
            )
        )
        # Tool spans inside the invocation are not invocations and must not count.
        spans.append(
            otlp_span(
                base + i,
                2,
                start_ms=1000 + i,
                duration_ms=9000,
                parent=1,
                attrs={
                    **invocation(agent, 1, "sessions/x", tenant),
                    "gen_ai.operation.name": "execute_tool",
                    "name": "execute_tool lookup",
                },
                error=True,
            )
        )
    for i in range(3):
        spans.append(
            otlp_span(
                base + 100 + i,
                1,
                1000 + i,
                100 + 10 * i,
                invocation(agent, 2, "sessions/v2", tenant),
            )
        )
    spans.append(
        otlp_span(
            base + 200, 1, 1500, 40, invocation(agent, 10, "sessions/v10", tenant), error=True
        )
    )
    # Before the window used below: counted without a window, not with it.
    spans.append(
        otlp_span(base + 300, 1, 0, 100_000, invocation(agent, 1, "sessions/early", tenant))
    )
    request = export_request(spans)
    md = who(tenant, user="")

    for _ in range(2):  # an exporter retrying the same batch must not double-count
        response = await telemetry.otlp.Export(request)
        assert response.partial_success.rejected_spans == 0
    windowed = pb.GetVersionMetricsRequest(
        agent=agent, start_time=timestamp(500), end_time=timestamp(2000)
    )
    result = await telemetry.api.GetVersionMetrics(windowed, metadata=md)

    assert [m.version for m in result.versions] == [f"{agent}/versions/{n}" for n in (1, 2, 10)]
    v1, v2, v10 = result.versions
    assert (v1.invocations, v1.errors, v1.sessions) == (20, 2, 4)
    assert v1.error_rate == pytest.approx(0.1)
    cuts = statistics.quantiles(durations, n=100, method="inclusive")
    assert v1.latency_p50_ms == pytest.approx(cuts[49]) == pytest.approx(39.0)
    assert v1.latency_p95_ms == pytest.approx(cuts[94]) == pytest.approx(81.85)
    assert v1.latency_p99_ms == pytest.approx(cuts[98]) == pytest.approx(216.37)
    assert (v2.invocations, v2.errors, v2.sessions, v2.latency_p50_ms) == (
        3,
        0,
        1,
        pytest.approx(110),
    )
    assert (v10.invocations, v10.errors, v10.error_rate) == (1, 1, 1.0)

    unbounded = await telemetry.api.GetVersionMetrics(
        pb.GetVersionMetricsRequest(agent=agent), metadata=md
    )
    assert (unbounded.versions[0].invocations, unbounded.versions[0].sessions) == (21, 5)
    spans_stored = await telemetry.api.ListSpans(
        pb.ListSpansRequest(filter=pb.SpanFilter(agent=agent), page_size=1000), metadata=md
    )
    assert len(spans_stored.spans) == len(spans)


async def test_paging_is_newest_first_and_complete(telemetry: Telemetry) -> None:
    tenant, agent = f"p-{uid()}", f"agents/paging-{uid()}"
    base = int(uuid.uuid4().int >> 64) << 32
    # Seven traces of 1 invocation + 2 children, several sharing a start time, to exercise ties.
    spans = []
    for t in range(7):
        attrs = invocation(agent, 1, f"sessions/{t}", tenant)
        spans.append(otlp_span(base + t, 1, t // 2, 10, attrs))
        for c in (2, 3):
            spans.append(
                otlp_span(
                    base + t,
                    c,
                    t // 2,
                    1,
                    {**attrs, "gen_ai.operation.name": "chat", "name": "chat"},
                    parent=1,
                )
            )
    await telemetry.otlp.Export(export_request(spans))
    md, f = who(tenant, user=""), pb.SpanFilter(agent=agent)

    seen, token, sizes = [], "", []
    while True:
        page = await telemetry.api.ListSpans(
            pb.ListSpansRequest(filter=f, page_size=8, page_token=token), metadata=md
        )
        seen += [(s.start_time.ToNanoseconds(), s.trace_id, s.span_id) for s in page.spans]
        sizes.append(len(page.spans))
        token = page.next_page_token
        if not token:
            break
    assert sizes == [8, 8, 5]
    assert len(seen) == 21 == len(set(seen))
    assert seen == sorted(seen, reverse=True)

    traces, token = [], ""
    for expected in (3, 3, 1):
        page = await telemetry.api.ListTraces(
            pb.ListTracesRequest(filter=f, page_size=3, page_token=token), metadata=md
        )
        assert len(page.traces) == expected
        traces += page.traces
        token = page.next_page_token
    assert token == ""
    assert len({t.trace_id for t in traces}) == 7
    assert all(t.span_count == 3 for t in traces)
    assert [t.start_time.ToNanoseconds() for t in traces] == sorted(
        (t.start_time.ToNanoseconds() for t in traces), reverse=True
    )

    first = await telemetry.api.ListSpans(pb.ListSpansRequest(filter=f, page_size=5), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        other = pb.SpanFilter(agent=agent, errors_only=True)
        await telemetry.api.ListSpans(
            pb.ListSpansRequest(filter=other, page_token=first.next_page_token), metadata=md
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(err.value)[1] == ["page_token"]


@pytest.mark.parametrize(
    ("request_filter", "field"),
    [
        (pb.SpanFilter(version="v1"), "filter.version"),
        (pb.SpanFilter(version="agents/x/versions/latest"), "filter.version"),
        (pb.SpanFilter(agent="progress-report"), "filter.agent"),
        (pb.SpanFilter(endpoint="prod"), "filter.endpoint"),
        (pb.SpanFilter(session="abc"), "filter.session"),
        (pb.SpanFilter(trace_id="123"), "filter.trace_id"),
        (pb.SpanFilter(agent="agents/a", version="agents/b/versions/1"), "filter.version"),
        (
            pb.SpanFilter(start_time=Timestamp(seconds=10), end_time=Timestamp(seconds=5)),
            "filter.end_time",
        ),
    ],
)
async def test_bad_filters_are_invalid_argument(
    telemetry: Telemetry, request_filter: pb.SpanFilter, field: str
) -> None:
    for call, request in (
        (telemetry.api.ListSpans, pb.ListSpansRequest(filter=request_filter)),
        (telemetry.api.ListTraces, pb.ListTracesRequest(filter=request_filter)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(err.value)[1] == [field]
        assert field in (err.value.details() or "")


async def test_bad_page_tokens_sizes_and_metrics_requests(telemetry: Telemetry) -> None:
    cases = [
        (telemetry.api.ListSpans(pb.ListSpansRequest(page_token="not-a-token")), "page_token"),
        (telemetry.api.ListTraces(pb.ListTracesRequest(page_token="eyJ4IjogMX0")), "page_token"),
        (telemetry.api.ListSpans(pb.ListSpansRequest(page_size=-1)), "page_size"),
        (telemetry.api.GetVersionMetrics(pb.GetVersionMetricsRequest()), "agent"),
        (
            telemetry.api.GetVersionMetrics(pb.GetVersionMetricsRequest(agent="progress-report")),
            "agent",
        ),
        (
            telemetry.api.GetVersionMetrics(
                pb.GetVersionMetricsRequest(
                    agent="agents/a",
                    start_time=Timestamp(seconds=10),
                    end_time=Timestamp(seconds=5),
                )
            ),
            "end_time",
        ),
    ]
    for call, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert error_details(err.value)[1] == [field]


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


async def test_trace_with_nested_invocations_is_summarised_once(telemetry: Telemetry) -> None:
    tenant, outer, inner = f"n-{uid()}", f"agents/planner-{uid()}", f"agents/helper-{uid()}"
    trace = int(uuid.uuid4().int >> 64)
    spans = [
        otlp_span(
            trace,
            1,
            0,
            100,
            {**invocation(outer, 1, "sessions/n", tenant), "name": "invoke_agent planner"},
        ),
        otlp_span(
            trace,
            2,
            10,
            20,
            {**invocation(inner, 4, "sessions/n", tenant), "name": "invoke_agent helper"},
            parent=1,
            error=True,
        ),
    ]
    await telemetry.otlp.Export(export_request(spans))
    md = who(tenant, user="")

    everything = await telemetry.api.ListTraces(pb.ListTracesRequest(), metadata=md)
    assert [(t.root_span_name, t.span_count, t.duration_ms) for t in everything.traces] == [
        ("invoke_agent planner", 2, 100)
    ]
    helper = await telemetry.api.ListTraces(
        pb.ListTracesRequest(filter=pb.SpanFilter(agent=inner)), metadata=md
    )
    assert [(t.root_span_name, t.version, t.status) for t in helper.traces] == [
        ("invoke_agent helper", f"{inner}/versions/4", pb.SPAN_STATUS_ERROR)
    ]
    failed = await telemetry.api.ListTraces(
        pb.ListTracesRequest(filter=pb.SpanFilter(errors_only=True)), metadata=md
    )
    assert [t.root_span_name for t in failed.traces] == ["invoke_agent helper"]


async def test_tokens_and_their_cost_per_version(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    prices = {"gpt-x": {"input": 1.0, "output": 4.0}}  # dollars per million tokens
    settings = harness.make_settings(database_url, redis_url, tmp_path,
                                     CORRAL_MODEL_PRICES=json.dumps(prices))
    host = await harness.start_service("telemetry", settings)
    tenant, agent = f"c-{uid()}", f"agents/cost-{uid()}"
    base = int(uuid.uuid4().int >> 64) << 32

    def chat(span: int, model: str, tokens_in: object, tokens_out: object) -> Span:
        parent = otlp_span(base, span, 10, 5, invocation(agent, 1, "sessions/c", tenant), parent=1)
        values = {"gen_ai.request.model": AnyValue(string_value=model),
                  "gen_ai.operation.name": AnyValue(string_value="chat")}
        for key, value in (("input_tokens", tokens_in), ("output_tokens", tokens_out)):
            values[f"gen_ai.usage.{key}"] = (AnyValue(int_value=value) if isinstance(value, int)
                                             else AnyValue(string_value=str(value)))
        parent.attributes.extend(KeyValue(key=k, value=v) for k, v in values.items())
        return parent

    spans = [
        otlp_span(base, 1, 0, 50, invocation(agent, 1, "sessions/c", tenant)),
        chat(2, "gpt-x", 1000, 500),
        chat(3, "local-llama", 200, 100),  # no price for it
        chat(4, "gpt-x", "lots", "more"),  # not numbers: ignored, and nothing breaks
    ]
    try:
        async with grpc.aio.insecure_channel(host.address) as channel:
            await trace_service_pb2_grpc.TraceServiceStub(channel).Export(export_request(spans))
            result = await TelemetryServiceStub(channel).GetVersionMetrics(
                pb.GetVersionMetricsRequest(agent=agent), metadata=who(tenant, user=""))
    finally:
        await host.stop(grace=0.5)
    [m] = result.versions
    assert (m.input_tokens, m.output_tokens) == (1200, 600)
    assert m.cost_usd == pytest.approx((1000 * 1.0 + 500 * 4.0) / 1_000_000)
    assert list(m.unpriced_models) == ["local-llama"]
