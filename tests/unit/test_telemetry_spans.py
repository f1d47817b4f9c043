"""OTLP → span rows and scores, filter validation and page tokens: telemetry's span domain and
its servicer's conversions, against fakes (no sockets)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from corral.names import AgentRef, VersionRef
from corral.telemetry.v1 import telemetry_pb2 as pb
from services.common.errors import InvalidArgument
from services.common.status import domain_error
from services.telemetry import otlp, rules
from services.telemetry.model import ScoreSource, SpanFilter, SpanRow
from services.telemetry.otlp import Exporter, export_batch
from services.telemetry.servicer import span_filter
from services.telemetry.spans import Telemetry
from tests.fakes.telemetry import FakeScoreStore, FakeSpanStore
from tests.otlp import export_request, kv

TRACE = bytes(range(16))
T0 = 1_700_000_000_000_000_000  # nanoseconds since the epoch


def platform(tenant: str) -> Exporter:
    """An export by a Corral service (trusted), whose spans name no tenant fall in `tenant`."""
    return Exporter(tenant, trusted=True)


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
    row = export_batch(export_request([parent]), platform("default")).rows[0]
    assert row.trace_id == "000102030405060708090a0b0c0d0e0f"
    assert row.span_id == "0000000000abcdef"
    assert row.parent_span_id == "0000000000000007"
    assert row.kind == "CLIENT"
    assert row.start_time == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert row.end_time - row.start_time == timedelta(microseconds=1500)
    assert row.duration_ms == pytest.approx(1.5)


def test_root_span_has_no_parent_and_end_before_start_is_zero_length() -> None:
    row = export_batch(export_request([span(end_time_unix_nano=T0 - 5)]), platform("default")).rows[0]
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
def test_status_codes(code: Status.StatusCode.ValueType, expected: str) -> None:
    row = export_batch(export_request([span(status=Status(code=code, message="boom"))]), platform("t")).rows[0]
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
    row = export_batch(export_request([span(attributes=attributes)], resource), platform("default")).rows[0]
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
    row = export_batch(
        export_request([span(attributes=[kv("gen_ai.operation.name", "chat")])]), platform("beta")
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
    row = export_batch(export_request([span(attributes=attributes, name="x\x00y")]), platform("t")).rows[0]
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
    conversion = export_batch(
        export_request([span(1), span(2, trace_id=b"short"), span(3, span_id=b"")]), platform("t")
    )
    assert [r.span_id for r in conversion.rows] == ["0000000000000001"]
    assert conversion.rejected == 2
    assert "trace_id must be 16 bytes" in conversion.reason


def evaluation(name: str, value: AnyValue, comment: str = "") -> Span.Event:
    return Span.Event(
        name="gen_ai.evaluation.result",
        attributes=[
            kv("gen_ai.evaluation.name", name),
            KeyValue(key="gen_ai.evaluation.score.value", value=value),
            kv("gen_ai.evaluation.explanation", comment),
        ],
    )


def test_scores_travel_as_evaluation_events_and_bad_ones_are_ignored() -> None:
    attributes = [
        kv("corral.session", "sessions/s1"),
        kv("corral.version", "agents/a/versions/2"),
    ]
    events = [
        evaluation("self_check", AnyValue(double_value=0.9), "looked fine"),
        evaluation("Bad Name", AnyValue(double_value=0.5)),
        evaluation("too_high", AnyValue(double_value=1.5)),
        evaluation("not_a_number", AnyValue(string_value="0.5")),
        Span.Event(name="exception"),
    ]
    batch = export_batch(
        export_request([span(attributes=attributes, events=events)], [kv("corral.agent", "agents/a")]),
        platform("acme"),
    )
    [score] = batch.scores
    assert (score.session, score.name, score.value, score.comment) == (
        "sessions/s1",
        "self_check",
        0.9,
        "looked fine",
    )
    assert (score.agent, score.version, score.tenant) == ("agents/a", "agents/a/versions/2", "acme")
    assert (score.source, score.user, score.trace_id) == (ScoreSource.CODE, "agent", TRACE.hex())
    no_session = export_batch(export_request([span(events=events[:1])]), platform("acme"))
    assert no_session.scores == []


def test_a_users_export_is_its_own_tenants_and_never_the_platforms_invocation() -> None:
    """The forge that once rolled back another tenant's canary: spans naming a victim's tenant,
    agent and version, an invocation that failed, a score. From a user they all stay in the
    user's tenant, under the user's name, and are not the platform's."""
    forged = [
        kv("gen_ai.operation.name", "invoke_agent"),
        kv("corral.tenant", "victim"),
        kv("corral.agent", "canary"),
        kv("corral.version", "3"),
        kv("corral.endpoint", "prod"),
        kv("corral.session", "sessions/s1"),
    ]
    events = [evaluation("quality", AnyValue(double_value=0.0))]
    batch = export_batch(
        export_request([span(attributes=forged, events=events, status=Status(code=2))]),
        Exporter("mallory-co", trusted=False, user="mallory"),
    )
    [row], [score] = batch.rows, batch.scores
    # Listed among the user's traces, never the platform's invocation.
    assert (row.tenant, row.is_invocation, row.platform) == ("mallory-co", True, False)
    assert (row.agent, row.version, row.endpoint) == (
        "agents/canary", "agents/canary/versions/3", "agents/canary/endpoints/prod"
    )
    assert (score.tenant, score.user, score.version) == (
        "mallory-co", "mallory", "agents/canary/versions/3"
    )
    # The same span from the platform keeps what it names, and is an invocation.
    trusted = export_batch(export_request([span(attributes=forged)]), platform("default")).rows[0]
    assert (trusted.tenant, trusted.is_invocation, trusted.platform) == ("victim", True, True)
    assert (trusted.agent, trusted.version) == ("canary", "3")


def test_attributes_are_bounded() -> None:
    many = [kv(f"k{i}", "v") for i in range(500)]
    huge = [kv("big", "x" * 100_000), kv("long-key-" + "k" * 1000, "v"),
            KeyValue(key="list", value=AnyValue(array_value=ArrayValue(
                values=[AnyValue(int_value=i) for i in range(10_000)])))]
    row = export_batch(export_request([span(attributes=huge + many)]), platform("t")).rows[0]
    assert len(row.attributes) == otlp.MAX_ATTRIBUTES + 1
    assert row.attributes[otlp.DROPPED_ATTR] == len(huge + many) - otlp.MAX_ATTRIBUTES
    big = row.attributes["big"]
    assert isinstance(big, str) and len(big) == otlp.MAX_VALUE_CHARS and big.endswith("…")
    assert all(len(key) <= otlp.MAX_KEY_CHARS for key in row.attributes)
    listed = row.attributes["list"]
    assert isinstance(listed, list) and len(listed) == otlp.MAX_ITEMS


def test_a_spans_attributes_are_bounded_in_all() -> None:
    """128 attributes of 4096 characters each would be half a megabyte a span: the whole is
    bounded, and what is left out is counted."""
    wide = [kv(f"k{i:03}", "x" * 10_000) for i in range(100)]
    row = export_batch(export_request([span(attributes=wide)]), platform("t")).rows[0]
    size = sum(len(k) + len(str(v)) for k, v in row.attributes.items())
    assert size <= otlp.MAX_ATTRIBUTE_CHARS + 64
    kept = len(row.attributes) - 1
    assert row.attributes[otlp.DROPPED_ATTR] == 100 - kept
    assert kept == otlp.MAX_ATTRIBUTE_CHARS // (otlp.MAX_VALUE_CHARS + 4) + 1


def test_nesting_is_bounded() -> None:
    value = AnyValue(string_value="leaf")
    for _ in range(20):
        value = AnyValue(array_value=ArrayValue(values=[value]))
    row = export_batch(export_request([span(attributes=[KeyValue(key="deep", value=value)])]),
                       platform("t")).rows[0]
    depth, node = 0, row.attributes["deep"]
    while isinstance(node, list):
        depth, node = depth + 1, node[0]
    assert depth == otlp.MAX_DEPTH and node == "…"


async def test_an_export_stores_its_spans_once_and_its_scores() -> None:
    spans, scores = FakeSpanStore(), FakeScoreStore()
    telemetry = Telemetry(spans, scores)
    events = [evaluation("self_check", AnyValue(int_value=1))]
    batch = export_batch(
        export_request(
            [
                span(1, attributes=[kv("corral.session", "sessions/s1")], events=events),
                span(2, trace_id=b"short"),
            ]
        ), platform("acme"),
    )
    first = await telemetry.export(batch)
    assert (first.accepted, first.stored, first.rejected) == (1, 1, 1)
    assert "trace_id must be 16 bytes" in first.reason
    assert [(s.session, s.value) for s in scores.scores] == [("sessions/s1", 1.0)]
    again = await telemetry.export(batch)  # an exporter's retry
    assert (again.accepted, again.stored) == (1, 0)
    assert len(spans.rows) == 1


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
    rows = {r.name: r for r in export_batch(encode_spans(finished), platform("default")).rows}
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


def refusal(call: Callable[[], object]) -> InvalidArgument:
    """The InvalidArgument a caller would see for `call()` (a bad name raises ResourceNameError,
    which the server kit reports the same way)."""
    with pytest.raises(Exception) as err:
        call()
    error = domain_error(err.value)
    assert isinstance(error, InvalidArgument), err.value
    return error


def checked(f: pb.SpanFilter) -> SpanFilter:
    """What ListSpans and ListTraces do with a request's filter before they query."""
    return rules.checked_filter(span_filter(f))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("agent", "progress-report"),
        ("version", "agents/progress-report/versions/v2"),
        ("version", "progress-report/versions/2"),
        ("endpoint", "agents/progress-report/prod"),
        ("session", "abc"),
        ("trace_id", "not-hex"),
        # Names the other services refuse, which telemetry's own patterns used to accept.
        ("agent", "agents/Progress_Report"),
        ("version", "agents/progress report/versions/2"),
        ("endpoint", "agents/progress-report/endpoints/1prod"),
        ("session", "sessions/-abc"),
    ],
)
def test_bad_filter_values_name_the_field(field: str, value: str) -> None:
    only = {field: value}
    error = refusal(lambda: checked(pb.SpanFilter(**only)))  # type: ignore[arg-type]  # a str field
    assert error.violations[0].field == f"filter.{field}"
    assert value in error.message


def test_filter_names_become_references() -> None:
    where = checked(
        pb.SpanFilter(
            agent="agents/a",
            version="agents/a/versions/3",
            endpoint="agents/a/endpoints/prod",
            session="sessions/s-1",
        )
    )
    assert where.agent == AgentRef("a")
    assert where.version == VersionRef("a", 3)
    assert where.endpoint is not None and where.endpoint.name == "agents/a/endpoints/prod"
    assert where.session is not None and where.session.session == "s-1"
    assert checked(pb.SpanFilter()) == SpanFilter()


def test_filter_version_must_belong_to_filter_agent() -> None:
    error = refusal(lambda: checked(pb.SpanFilter(agent="agents/a", version="agents/b/versions/1")))
    assert error.violations[0].field == "filter.version"


def test_filter_window_must_not_be_reversed_and_trace_id_is_normalised() -> None:
    now = datetime.now(UTC)
    with pytest.raises(InvalidArgument) as err:
        rules.checked_filter(SpanFilter(start_time=now, end_time=now - timedelta(seconds=1)))
    assert err.value.violations[0].field == "filter.end_time"
    assert rules.checked_filter(SpanFilter(trace_id="AB" * 16)).trace_id == "ab" * 16


def telemetry_with_spans(count: int, tenant: str = "acme") -> Telemetry:
    """Telemetry over a fake store holding `count` invocation spans of one agent, one a trace,
    several starting at the same time (to exercise ties)."""
    store = FakeSpanStore()
    for i in range(count):
        row = export_batch(
            export_request(
                [
                    span(
                        1,
                        trace_id=i.to_bytes(16, "big"),
                        start_time_unix_nano=T0 + (i // 3) * 1000,
                        attributes=[
                            kv("gen_ai.operation.name", "invoke_agent"),
                            kv("corral.agent", "agents/a"),
                            kv("corral.version", "agents/a/versions/1"),
                        ],
                    )
                ]
            ),
            platform(tenant),
        ).rows[0]
        store.put(row)
    return Telemetry(store, FakeScoreStore())


async def test_page_size_default_and_cap() -> None:
    telemetry = telemetry_with_spans(1001)
    for requested, expected in ((0, 100), (5, 5), (5000, 1000)):
        page = await telemetry.list_spans("acme", SpanFilter(), requested, "")
        assert len(page.items) == expected
    with pytest.raises(InvalidArgument) as err:
        await telemetry.list_spans("acme", SpanFilter(), -1, "")
    assert err.value.violations[0].field == "page_size"


async def test_pages_are_newest_first_complete_and_bound_to_their_query() -> None:
    telemetry = telemetry_with_spans(10)
    where = SpanFilter(version=VersionRef("a", 1))
    seen: list[SpanRow] = []
    token = ""
    while True:
        page = await telemetry.list_spans("acme", where, 4, token)
        seen += page.items
        token = page.next_page_token
        if not token:
            break
    keys = [(r.start_time, r.trace_id, r.span_id) for r in seen]
    assert len(keys) == 10 == len(set(keys))
    assert keys == sorted(keys, reverse=True)

    first = await telemetry.list_spans("acme", where, 4, "")
    traces = await telemetry.list_traces("acme", where, 3, "")
    assert [t.trace_id for t in traces.items] == [r.trace_id for r in first.items[:3]]
    for call in (
        lambda: telemetry.list_traces("acme", where, 4, first.next_page_token),
        lambda: telemetry.list_spans("beta", where, 4, first.next_page_token),
        lambda: telemetry.list_spans("acme", SpanFilter(), 4, first.next_page_token),
    ):
        with pytest.raises(InvalidArgument) as err:
            await call()
        assert err.value.violations[0].field == "page_token"


@pytest.mark.parametrize(
    "token", ["garbage!", "e30", "bm90IGpzb24", "eyJmIjoxLCJ0IjoieCIsInRyIjoxLCJzIjoyfQ"]
)
async def test_malformed_page_tokens(token: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        await telemetry_with_spans(1).list_spans("acme", SpanFilter(), 0, token)
    assert err.value.violations[0].field == "page_token"


def invocation(version: str, trace_id: bytes) -> Span:
    attributes = [
        kv("gen_ai.operation.name", "invoke_agent"),
        kv("corral.agent", "agents/a"),
        kv("corral.version", version),
    ]
    return span(attributes=attributes, trace_id=trace_id)


def chat(number: int, model: str, tokens_in: int, tokens_out: int) -> Span:
    attributes = [
        kv("corral.agent", "agents/a"),
        kv("corral.version", "agents/a/versions/2"),
        kv("gen_ai.request.model", model),
        KeyValue(key="gen_ai.usage.input_tokens", value=AnyValue(int_value=tokens_in)),
        KeyValue(key="gen_ai.usage.output_tokens", value=AnyValue(int_value=tokens_out)),
    ]
    return span(number, attributes=attributes)


async def test_version_metrics_in_version_order_with_their_cost() -> None:
    spans = [
        invocation("agents/a/versions/10", trace_id=b"\x01" * 16),
        invocation("agents/a/versions/2", trace_id=b"\x02" * 16),
        invocation("agents/a/versions/latest", trace_id=b"\x03" * 16),
        chat(2, "gpt-x", 1000, 500),
        chat(3, "local-llama", 200, 100),
    ]
    prices = {"gpt-x": (1.0, 4.0)}  # dollars per million tokens
    telemetry = Telemetry(FakeSpanStore(), FakeScoreStore(), prices)
    await telemetry.export(export_batch(export_request(spans), platform("acme")))
    metrics = await telemetry.version_metrics("acme", AgentRef("a"), None, None)
    assert [m.version for m in metrics] == [
        "agents/a/versions/2",
        "agents/a/versions/10",
        "agents/a/versions/latest",  # not a numbered version (spans are not validated): last
    ]
    v2 = metrics[0]
    assert (v2.counts.input_tokens, v2.counts.output_tokens) == (1200, 600)
    assert v2.cost_usd == pytest.approx((1000 * 1.0 + 500 * 4.0) / 1_000_000)
    assert v2.unpriced_models == ("local-llama",)
    with pytest.raises(InvalidArgument) as err:
        await telemetry.version_metrics(
            "acme", AgentRef("a"), datetime.now(UTC), datetime.now(UTC) - timedelta(seconds=1)
        )
    assert err.value.violations[0].field == "end_time"
