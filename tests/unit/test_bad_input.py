"""The kit's defences against hostile input: errors that quote at most a bounded part of what was
sent, Timestamps and Durations outside their range, and strings with NUL characters."""

from __future__ import annotations

from datetime import timedelta

import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from corral import names
from corral.registry.v1 import keys_pb2, registry_pb2
from corral.telemetry.v1 import telemetry_pb2
from services.common.decoding import _tolerant, _Undecodable, refused_field
from services.common.errors import MAX_MESSAGE, InvalidArgument, bounded, quoted
from services.common.status import to_status
from services.common.timestamps import checked_duration, optional_time

HUGE = "x" * 1_000_000


def test_quoted_keeps_short_values_whole_and_cuts_long_ones() -> None:
    assert quoted("agents/a") == "'agents/a'"
    shown = quoted(HUGE)
    assert len(shown) < 200
    assert "1000000 characters" in shown


def test_bounded_keeps_the_end_of_a_long_message() -> None:
    message = f"name: {HUGE!r} is not a name; use agents/{{agent}}"
    cut = bounded(message)
    assert len(cut.encode()) <= MAX_MESSAGE
    assert cut.startswith("name: 'xxx")
    assert cut.endswith("use agents/{agent}")
    assert bounded("short") == "short"


def test_bounded_counts_bytes_not_characters() -> None:
    assert len(bounded("é" * 10_000).encode()) <= MAX_MESSAGE


def test_a_status_never_carries_a_huge_input() -> None:
    error = InvalidArgument.field("agent_id", f"{HUGE} is not an id")
    built = to_status(error, "registry")
    assert len(built.details.encode()) <= MAX_MESSAGE
    [(_, packed)] = built.trailing_metadata
    assert len(packed) < 2 * 1024


def test_a_resource_name_error_quotes_only_the_start_of_the_name() -> None:
    with pytest.raises(names.ResourceNameError) as info:
        names.AgentRef.parse("agents/" + HUGE)
    assert len(info.value.message) < 400


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(2**62, 0), (-(2**62), 0), (0, -1), (0, 1_000_000_000), (253_402_300_800, 0)],
)
def test_a_timestamp_outside_its_range_is_invalid_argument_naming_the_field(
    seconds: int, nanos: int
) -> None:
    key = keys_pb2.Key(expire_time=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))
    with pytest.raises(InvalidArgument) as info:
        optional_time(key, "expire_time", "key.expire_time")
    assert [v.field for v in info.value.violations] == ["key.expire_time"]
    assert info.value.reason == "OUT_OF_RANGE"


def test_the_edges_of_the_timestamp_range_are_accepted() -> None:
    for seconds in (-62_135_596_800, 253_402_300_799):
        key = keys_pb2.Key(expire_time=timestamp_pb2.Timestamp(seconds=seconds))
        assert optional_time(key, "expire_time") is not None
    assert optional_time(keys_pb2.Key(), "expire_time") is None


@pytest.mark.parametrize(
    ("seconds", "nanos", "words"),
    [
        (-1, 0, "negative"),
        (2**62, 0, "not a valid Duration"),
        (1, -5, "not a valid Duration"),
        (0, 2_000_000_000, "not a valid Duration"),
        (3600, 0, "at most"),
    ],
)
def test_a_bad_duration_is_invalid_argument(seconds: int, nanos: int, words: str) -> None:
    key = keys_pb2.Key(ttl=duration_pb2.Duration(seconds=seconds, nanos=nanos))
    with pytest.raises(InvalidArgument) as info:
        checked_duration(key, "ttl", "key.ttl", maximum=timedelta(minutes=1))
    assert words in info.value.message
    assert [v.field for v in info.value.violations] == ["key.ttl"]


def test_a_good_duration_is_a_timedelta() -> None:
    key = keys_pb2.Key(ttl=duration_pb2.Duration(seconds=30, nanos=500_000_000))
    assert checked_duration(key, "ttl") == timedelta(seconds=30.5)
    assert checked_duration(keys_pb2.Key(), "ttl") is None


def nul_field(message: Message) -> str | None:
    refused = refused_field(message)
    return refused[0] if refused is not None else None


def test_nul_characters_are_found_at_any_depth() -> None:
    assert nul_field(registry_pb2.CreateAgentRequest(agent_id="ok")) is None
    assert nul_field(registry_pb2.CreateAgentRequest(agent_id="a\0b")) == "agent_id"
    endpoint = registry_pb2.UpdateEndpointRequest(
        endpoint=registry_pb2.Endpoint(
            traffic=[registry_pb2.TrafficTarget(version="v"), registry_pb2.TrafficTarget(version="\0")]
        )
    )
    assert nul_field(endpoint) == "endpoint.traffic[1].version"
    value = struct_pb2.Struct()
    value.update({"outer": {"inner": ["fine", "bad\0"]}})
    found = nul_field(value)
    assert found is not None and found.startswith("fields['outer']")
    keyed = struct_pb2.Struct()
    keyed.update({"k\0": 1})
    assert nul_field(keyed) == "fields (a key)"


def test_a_number_that_is_no_value_of_its_enum_is_refused_naming_the_field() -> None:
    request = telemetry_pb2.CompareVersionsRequest(
        metrics=[telemetry_pb2.MetricSpec(
            name="latency_p95", direction=telemetry_pb2.METRIC_DIRECTION_HIGHER_IS_BETTER
        )]
    )
    assert refused_field(request) is None
    request.metrics[0].direction = 999  # type: ignore[assignment]
    refused = refused_field(request)
    assert refused is not None
    field, description = refused
    assert field == "metrics[0].direction"
    assert "999 is not a MetricDirection" in description and "HIGHER_IS_BETTER" in description


def test_a_nul_refuses_a_corral_request_but_not_an_otlp_export() -> None:
    """OTLP exporters send what their spans carry: one attribute with a NUL must not lose a whole
    batch (telemetry strips NULs where it stores spans). Corral's own requests are refused."""
    span = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="a\x00b")
    export = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])]
    )
    decode = _tolerant(ExportTraceServiceRequest.FromString)
    assert decode is not None and decode(export.SerializeToString()) == export
    corral = _tolerant(registry_pb2.GetAgentRequest.FromString)
    assert corral is not None
    refused = corral(registry_pb2.GetAgentRequest(name="agents/a\x00").SerializeToString())
    assert isinstance(refused, _Undecodable)
    assert [v.field for v in refused.error.violations] == ["name"]
