"""Every field a Corral method takes states its limits in the proto (corral.options.v1.limits),
the limits agree with the rules that check the same fields, and the decoding interceptor refuses
a request one past a limit and accepts one at it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import rollouts_pb2 as ro
from corral.router.v1 import router_pb2 as rt
from corral.sessions.v1 import sessions_pb2 as ss
from corral.telemetry.v1 import telemetry_pb2 as tel
from services.common.decoding import limits_of, refused_field
from services.registry import rollout_rules, rules, tool_rules
from services.router import router, servicer
from services.sessions import rules as session_rules
from services.telemetry import rules as telemetry_rules
from tests.unit.test_method_access import served_services

# Fixed-size messages: nothing in them can grow.
FIXED = {"google.protobuf.Timestamp", "google.protobuf.Duration"}


def request_fields() -> Iterator[FieldDescriptor]:
    """Every field of every message a served method takes, at any depth, once."""
    pool = descriptor_pool.Default()
    seen: set[str] = set()

    def walk(message: Descriptor) -> Iterator[FieldDescriptor]:
        if message.full_name in seen or not message.full_name.startswith("corral."):
            return
        seen.add(message.full_name)
        for field in message.fields:
            yield field
            entry = field.message_type
            if entry is not None:
                if entry.GetOptions().map_entry:
                    entry = entry.fields_by_name["value"].message_type
                if entry is not None:
                    yield from walk(entry)

    for service in served_services():
        for method in pool.FindServiceByName(service).methods:
            yield from walk(method.input_type)


def needed(field: FieldDescriptor) -> set[str]:
    """The limits `field` must state."""
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        wanted = {"max_items"}
        if key.type == FieldDescriptor.TYPE_STRING:
            wanted.add("max_key_length")
        if value.message_type is None and value.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
            wanted.add("max_length")
        return wanted
    wanted = {"max_items"} if field.is_repeated else set()
    if entry is not None:
        if not entry.full_name.startswith("corral.") and entry.full_name not in FIXED:
            wanted.add("max_size")
    elif field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        wanted.add("max_length")
    return wanted


def test_every_request_field_that_can_grow_states_its_limits() -> None:
    fields = list(request_fields())
    assert len(fields) > 150
    missing = []
    for field in fields:
        limits = limits_of(field)
        for name in sorted(needed(field)):
            if limits is None or not getattr(limits, name):
                missing.append(f"{field.full_name}: {name}")
    assert missing == [], "add [(corral.options.v1.limits) = {...}] to these fields"


def _limit(message: type[Message], field: str) -> int:
    limits = limits_of(message.DESCRIPTOR.fields_by_name[field])
    assert limits is not None
    return limits.max_length


# Fields that a rule also checks: the proto states the rule's own limit.
AGREEING = [
    (reg.Endpoint, "description", rules.MAX_ENDPOINT_DESCRIPTION_CHARS),
    (reg.ListAuditEventsRequest, "resource_prefix", rules.MAX_RESOURCE_PREFIX_CHARS),
    (ro.Rollout, "webhook_url", rollout_rules.MAX_WEBHOOK_URL_CHARS),
    (ro.Experiment, "webhook_url", rollout_rules.MAX_WEBHOOK_URL_CHARS),
    (rt.InvokeRequest, "content_type", router.MAX_CONTENT_TYPE_CHARS),
    (rt.InvokeRequest, "attributes", servicer.MAX_ATTRIBUTE_VALUE_CHARS),
    (ss.UpdateSessionStateRequest, "state", session_rules.MAX_STATE_BYTES),
    (ss.CommitTurnRequest, "state", session_rules.MAX_STATE_BYTES),
    (ss.CommitTurnRequest, "input", session_rules.MAX_TURN_PAYLOAD_BYTES),
    (tel.Score, "comment", telemetry_rules.MAX_COMMENT),
]


@pytest.mark.parametrize(("message", "field", "rule"), AGREEING)
def test_the_proto_states_the_rules_limit(message: type[Message], field: str, rule: int) -> None:
    assert _limit(message, field) == rule


def test_tool_fields_state_the_tool_rules_limits() -> None:
    from corral.registry.v1 import tools_pb2

    assert _limit(tools_pb2.Tool, "secret") == tool_rules.MAX_SECRET_CHARS
    assert _limit(tools_pb2.Tool, "address") == tool_rules.MAX_ADDRESS_CHARS
    assert _limit(tools_pb2.Tool, "description") == tool_rules.MAX_DESCRIPTION_CHARS


def test_attribute_map_limits_agree_with_the_router() -> None:
    limits = limits_of(rt.InvokeRequest.DESCRIPTOR.fields_by_name["attributes"])
    assert limits is not None
    assert limits.max_items == servicer.MAX_ATTRIBUTES
    assert limits.max_key_length == servicer.MAX_ATTRIBUTE_KEY_CHARS


def test_a_string_at_its_limit_passes_and_one_more_character_is_refused() -> None:
    limit = _limit(rt.InvokeRequest, "agent")
    assert refused_field(rt.InvokeRequest(agent="é" * limit)) is None
    assert refused_field(rt.InvokeRequest(agent="é" * (limit + 1))) == (
        "agent", f"is {limit + 1} characters long, over the limit of {limit} characters")


def test_bytes_are_counted_in_bytes() -> None:
    limit = _limit(ss.CommitTurnRequest, "output")
    assert refused_field(ss.CommitTurnRequest(output=b"x" * limit)) is None
    path, why = refused_field(ss.CommitTurnRequest(output=b"x" * (limit + 1))) or ("", "")
    assert (path, why) == ("output", f"is {limit + 1} bytes long, over the limit of {limit} bytes")


def test_lists_maps_and_map_keys_are_bounded() -> None:
    many = {f"k{i}": "v" for i in range(servicer.MAX_ATTRIBUTES + 1)}
    assert refused_field(rt.InvokeRequest(attributes=many)) == (
        "attributes", f"has {len(many)} entries, over the limit of {servicer.MAX_ATTRIBUTES}")
    long_key = "k" * (servicer.MAX_ATTRIBUTE_KEY_CHARS + 1)
    found = refused_field(rt.InvokeRequest(attributes={long_key: "v"}))
    assert found is not None and found[0] == "attributes (a key)"
    found = refused_field(rt.InvokeRequest(attributes={"org": "v" * 5000}))
    assert found is not None and found[0] == "attributes['org']"


def test_limits_apply_inside_repeated_messages() -> None:
    steps = ro.Rollout(steps=[ro.RolloutStep() for _ in range(1000)])
    found = refused_field(steps)
    assert found is not None and found[0] == "steps" and "over the limit" in found[1]
    endpoint = reg.Endpoint(traffic=[reg.TrafficTarget(version="v" * 100_000, percent=100)])
    found = refused_field(endpoint)
    assert found is not None and found[0] == "traffic[0].version"


def test_an_update_mask_is_bounded_by_its_size() -> None:
    request = reg.UpdateEndpointRequest()
    request.update_mask.paths.extend(["traffic"] * 500)
    found = refused_field(request)
    assert found is not None and found[0] == "update_mask" and "bytes serialized" in found[1]
