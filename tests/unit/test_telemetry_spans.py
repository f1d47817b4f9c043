"""OTLP → span rows, filter validation and page tokens: telemetry's domain without sockets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as OtlpResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from services.common.errors import InvalidArgument
from services.telemetry.spans import (
    Cursor,
    SpanFilter,
    check_agent,
    decode_page_token,
    encode_page_token,
    page_size,
    rows_from_export,
)

TRACE = bytes(range(16))
T0 = 1_700_000_000_000_000_000  # nanoseconds since the epoch


def kv(key: str, value: AnyValue | str) -> KeyValue:
    return KeyValue(
        key=key, value=AnyValue(string_value=value) if isinstance(value, str) else value
    )


def request(spans: list[Span], resource: list[KeyValue] | None = None) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=OtlpResource(attributes=resource or []),
                scope_spans=[ScopeSpans(spans=spans)],
            )
        ]
    )


def span(number: int = 1, **fields: object) -> Span:
    values: dict[str, object] = {
        "trace_id": TRACE,
        "span_id": number.to_bytes(8, "big"),
        "name": "work",
        "start_time_unix_nano": T0,
        "end_time_unix_nano": T0 + 1_500_000,
    }
    values.update(fields)
    return Span(**values)  # type: ignore[arg-type]


def test_ids_are_hex_and_durations_in_milliseconds() -> None:
    parent = span(0xABCDEF, parent_span_id=(7).to_bytes(8, "big"), kind=Span.SPAN_KIND_CLIENT)
    row = rows_from_export(request([parent]), "default").rows[0]
    assert row.trace_id == "000102030405060708090a0b0c0d0e0f"
    assert row.span_id == "0000000000abcdef"
    assert row.parent_span_id == "0000000000000007"
    assert row.kind == "CLIENT"
    assert row.start_time == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert row.end_time - row.start_time == timedelta(microseconds=1500)
    assert row.duration_ms == pytest.approx(1.5)


def test_root_span_has_no_parent_and_end_before_start_is_zero_length() -> None:
    row = rows_from_export(request([span(end_time_unix_nano=T0 - 5)]), "default").rows[0]
    assert row.parent_span_id == ""
    assert row.duration_ms == 0
    assert row.end_time == row.start_time


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (Status.STATUS_CODE_UNSET, "UNSET"),
        (Status.STATUS_CODE_OK, "OK"),
        (Status.STATUS_CODE_ERROR, "ERROR"),
    ],
)
def test_status_codes(code: int, expected: str) -> None:
    row = rows_from_export(request([span(status=Status(code=code, message="boom"))]), "t").rows[0]
    assert row.status == expected
    assert row.status_message == "boom"


def test_corral_columns_from_span_attributes_falling_back_to_resource() -> None:
    resource = [
        kv("service.name", "corral-executor"),
        kv("corral.tenant", "acme"),
        kv("corral.agent", "agents/other"),
        kv("corral.endpoint", "agents/progress-report/endpoints/prod"),
    ]
    attributes = [
        kv("corral.agent", "agents/progress-report"),
        kv("corral.version", "agents/progress-report/versions/2"),
        kv("corral.session", "sessions/abc"),
        kv("corral.invocation", "inv-1"),
        kv("gen_ai.operation.name", "invoke_agent"),
    ]
    row = rows_from_export(request([span(attributes=attributes)], resource), "default").rows[0]
    assert row.service == "corral-executor"
    assert row.agent == "agents/progress-report"  # the span wins over the resource
    assert row.version == "agents/progress-report/versions/2"
    assert row.endpoint == "agents/progress-report/endpoints/prod"
    assert row.session == "sessions/abc"
    assert row.tenant == "acme"
    assert row.invocation_id == "inv-1"
    assert row.is_invocation
    assert row.resource["service.name"] == "corral-executor"


def test_span_without_tenant_belongs_to_the_exporting_tenant() -> None:
    row = rows_from_export(
        request([span(attributes=[kv("gen_ai.operation.name", "chat")])]), "beta"
    ).rows[0]
    assert row.tenant == "beta"
    assert not row.is_invocation
    assert (row.agent, row.version, row.endpoint, row.session, row.service) == ("", "", "", "", "")


def test_attribute_values_of_every_kind_become_json() -> None:
    attributes = [
        KeyValue(key="i", value=AnyValue(int_value=-(2**40))),
        KeyValue(key="d", value=AnyValue(double_value=0.25)),
        KeyValue(key="nan", value=AnyValue(double_value=float("nan"))),
        KeyValue(key="b", value=AnyValue(bool_value=True)),
        KeyValue(key="raw", value=AnyValue(bytes_value=b"\x00\xff")),
        KeyValue(
            key="list",
            value=AnyValue(
                array_value=ArrayValue(values=[AnyValue(string_value="a"), AnyValue(int_value=2)])
            ),
        ),
        KeyValue(key="map", value=AnyValue(kvlist_value=KeyValueList(values=[kv("k", "v")]))),
        KeyValue(key="empty", value=AnyValue()),
        kv("nul", "a\x00b"),
    ]
    row = rows_from_export(request([span(attributes=attributes, name="x\x00y")]), "t").rows[0]
    assert row.attributes == {
        "i": -(2**40),
        "d": 0.25,
        "nan": "nan",
        "b": True,
        "raw": "AP8=",
        "list": ["a", 2],
        "map": {"k": "v"},
        "empty": None,
        "nul": "ab",  # PostgreSQL refuses NUL in text and jsonb
    }
    assert row.name == "xy"


def test_spans_with_malformed_ids_are_rejected_and_counted() -> None:
    conversion = rows_from_export(
        request([span(1), span(2, trace_id=b"short"), span(3, span_id=b"")]), "t"
    )
    assert [r.span_id for r in conversion.rows] == ["0000000000000001"]
    assert conversion.rejected == 2
    assert "trace_id must be 16 bytes" in conversion.reason


def test_spans_from_the_real_sdk_encoder() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "corral-executor"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with (
        tracer.start_as_current_span(
            "invoke_agent progress-report",
            kind=SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": "invoke_agent",
                "corral.version": "agents/progress-report/versions/3",
                "corral.tenant": "acme",
                "tokens": 12,
            },
        ) as root,
        tracer.start_as_current_span("execute_tool session_data") as child,
    ):
        child.set_status(StatusCode.ERROR, "tool failed")
    provider.shutdown()
    finished = exporter.get_finished_spans()
    rows = {r.name: r for r in rows_from_export(encode_spans(finished), "default").rows}
    invocation, tool = rows["invoke_agent progress-report"], rows["execute_tool session_data"]
    assert invocation.trace_id == format(root.get_span_context().trace_id, "032x")
    assert invocation.span_id == format(root.get_span_context().span_id, "016x")
    assert tool.parent_span_id == invocation.span_id
    assert invocation.is_invocation and not tool.is_invocation
    assert invocation.kind == "SERVER"
    assert invocation.service == "corral-executor"
    assert invocation.attributes["tokens"] == 12
    assert invocation.tenant == "acme"
    assert tool.tenant == "default"  # names no tenant: the exporter's
    assert tool.status == "ERROR" and tool.status_message == "tool failed"
    assert invocation.status == "UNSET"
    sdk_root = next(s for s in finished if s.name == "invoke_agent progress-report")
    assert sdk_root.start_time is not None and sdk_root.end_time is not None
    assert invocation.duration_ms == pytest.approx((sdk_root.end_time - sdk_root.start_time) / 1e6)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("agent", "progress-report"),
        ("version", "agents/progress-report/versions/v2"),
        ("version", "progress-report/versions/2"),
        ("endpoint", "agents/progress-report/prod"),
        ("session", "abc"),
        ("trace_id", "not-hex"),
    ],
)
def test_bad_filter_values_name_the_field(field: str, value: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        SpanFilter(**{field: value}).validated()  # type: ignore[arg-type]
    assert err.value.violations[0].field == f"filter.{field}"
    assert value in err.value.message


def test_filter_version_must_belong_to_filter_agent() -> None:
    with pytest.raises(InvalidArgument) as err:
        SpanFilter(agent="agents/a", version="agents/b/versions/1").validated()
    assert err.value.violations[0].field == "filter.version"


def test_filter_window_must_not_be_reversed_and_trace_id_is_normalised() -> None:
    now = datetime.now(UTC)
    with pytest.raises(InvalidArgument) as err:
        SpanFilter(start_time=now, end_time=now - timedelta(seconds=1)).validated()
    assert err.value.violations[0].field == "filter.end_time"
    assert SpanFilter(trace_id="AB" * 16).validated().trace_id == "ab" * 16


def test_agent_is_required_for_metrics() -> None:
    with pytest.raises(InvalidArgument) as err:
        check_agent("")
    assert err.value.violations[0].field == "agent"
    assert check_agent("agents/progress-report") == "agents/progress-report"


def test_page_size_default_and_cap() -> None:
    assert page_size(0) == 100
    assert page_size(5) == 5
    assert page_size(5000) == 1000
    with pytest.raises(InvalidArgument):
        page_size(-1)


def test_page_token_round_trip_and_binding_to_its_query() -> None:
    f = SpanFilter(version="agents/a/versions/1")
    cursor = Cursor(datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "ab" * 16, "cd" * 8)
    token = encode_page_token("spans", "acme", f, cursor)
    assert decode_page_token(token, "spans", "acme", f) == cursor
    assert decode_page_token("", "spans", "acme", f) is None
    for kind, tenant, other in (
        ("traces", "acme", f),
        ("spans", "beta", f),
        ("spans", "acme", SpanFilter()),
    ):
        with pytest.raises(InvalidArgument) as err:
            decode_page_token(token, kind, tenant, other)
        assert err.value.violations[0].field == "page_token"


@pytest.mark.parametrize(
    "token", ["garbage!", "e30", "bm90IGpzb24", "eyJmIjoxLCJ0IjoieCIsInRyIjoxLCJzIjoyfQ"]
)
def test_malformed_page_tokens(token: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        decode_page_token(token, "spans", "acme", SpanFilter())
    assert err.value.violations[0].field == "page_token"
