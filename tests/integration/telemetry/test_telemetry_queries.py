"""Telemetry against a real server and PostgreSQL: listing spans and traces page by page,
newest first; nested invocations summarised once; bad filters, page tokens and sizes refused."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from corral.telemetry.v1 import telemetry_pb2 as pb
from tests.otlp import export_request, invocation, otlp_span
from tests.rpc import error_details, who
from tests.telemetry_client import Telemetry, uid

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


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
