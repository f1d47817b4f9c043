"""Telemetry against a real server and PostgreSQL: per-version metrics worked out by hand and
never double-counted, and tokens and their cost per version."""

from __future__ import annotations

import json
import statistics
import uuid
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from corral.telemetry.v1 import telemetry_pb2 as pb
from corral.telemetry.v1.telemetry_pb2_grpc import TelemetryServiceStub
from tests import harness
from tests.credentials import internal_channel, public_channel
from tests.otlp import MS, T0, export_request, invocation, otlp_span
from tests.rpc import who
from tests.telemetry_client import Telemetry, uid

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


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
        settings = settings.with_address("telemetry", host.address, host.internal_address)
        async with (
            public_channel(host.address) as channel,
            internal_channel(settings, "telemetry", "executor") as executor,
        ):
            await trace_service_pb2_grpc.TraceServiceStub(executor).Export(export_request(spans))
            result = await TelemetryServiceStub(channel).GetVersionMetrics(
                pb.GetVersionMetricsRequest(agent=agent), metadata=who(tenant, user=""))
    finally:
        await host.stop(grace=0.5)
    [m] = result.versions
    assert (m.input_tokens, m.output_tokens) == (1200, 600)
    assert m.cost_usd == pytest.approx((1000 * 1.0 + 500 * 4.0) / 1_000_000)
    assert list(m.unpriced_models) == ["local-llama"]
