"""Hostile requests generated from the proto descriptors, for every method a service serves: wire
bytes that do not parse, and messages with one field set to a value a careless or malicious
client would send. tests/integration/test_fuzz.py sends them and judges the answers."""

from __future__ import annotations

import base64
import functools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from google.api import resource_pb2
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.descriptor_pb2 import FieldOptions, MessageOptions
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

MB = 1024 * 1024
BIG_STRING = "a" * MB
MEDIUM_STRING = "b" * 64 * 1024
BIG_BYTES = b"\x00" * (5 * MB)
# Values of a page token: garbage, numbers a JSON parser reads as huge or infinite, the wrong
# types, and a well-formed token of another query.
_TOKEN_BODIES: list[object] = [
    {"v": 1, "f": "0" * 16, "k": [1e400]},
    {"v": 1, "f": "0" * 16, "k": [99999999999999999999999, "x"]},
    {"v": 1, "f": "0" * 16, "k": ["x", "y", "z"]},
    {"v": 1, "f": "0" * 16, "k": [-99999999999999999999999, "a", "b"]},
    {"v": "1", "f": 5, "k": {}},
    # Well-formed, but issued for another query (another method, tenant or filter).
    {"v": 1, "f": "0123456789abcdef", "k": [1_700_000_000_000_000, "x"]},
    {"v": 1, "f": "0123456789abcdef", "k": [42]},
    [1, 2, 3],
]
PAGE_TOKENS = [
    "garbage!",
    "%%%",
    "99999999999999999999999",
    "1e400",
    base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
    *(base64.urlsafe_b64encode(json.dumps(b).encode()).decode().rstrip("=") for b in _TOKEN_BODIES),
    "A" * 10_000,
]
RESOURCE_NAMES = [
    "agents/",
    "agents/../../etc/passwd",
    "agents/a/versions/99999999999999999999999",
    "agents/a/versions/-1",
    "sessions/\x00",
    "tools/" + "x" * 5000,
    "agents/" + BIG_STRING,
]
STRINGS = ["", " ", "\u202e\u0000\ud7ff", "../../etc", "a" * 300]
# Outside what Timestamp and Duration allow, and at the edges of what they do.
TIMESTAMPS = [(2**62, 0), (-(2**62), 0), (0, -1), (0, 2_000_000_000), (253_402_300_799, 999_999_999)]
DURATIONS = [(-1, 0), (2**62, 0), (1, -5), (0, 2_000_000_000), (315_576_000_000, 0)]
_INTS = {
    FieldDescriptor.TYPE_INT32: [-1, -(2**31), 2**31 - 1],
    FieldDescriptor.TYPE_SINT32: [-1, -(2**31), 2**31 - 1],
    FieldDescriptor.TYPE_SFIXED32: [-1, -(2**31), 2**31 - 1],
    FieldDescriptor.TYPE_INT64: [-1, -(2**63), 2**63 - 1],
    FieldDescriptor.TYPE_SINT64: [-1, -(2**63), 2**63 - 1],
    FieldDescriptor.TYPE_SFIXED64: [-1, -(2**63), 2**63 - 1],
    FieldDescriptor.TYPE_UINT32: [2**32 - 1],
    FieldDescriptor.TYPE_FIXED32: [2**32 - 1],
    FieldDescriptor.TYPE_UINT64: [2**64 - 1],
    FieldDescriptor.TYPE_FIXED64: [2**64 - 1],
}
FLOATS = [math.nan, math.inf, -math.inf, -1.0, 1e308]


@dataclass(frozen=True)
class Case:
    """One hostile request: what it is (for the failure report) and its messages' wire bytes (a
    unary request has one; a request stream has any number)."""

    what: str
    messages: tuple[bytes, ...]


def method_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def methods_of(services: list[str]) -> list[MethodDescriptor]:
    pool = descriptor_pool.Default()
    return [m for name in services for m in pool.FindServiceByName(name).methods]


# What each {part} of a resource pattern is filled with in a plausible request.
_PARTS = {"agent": "fz-agent", "endpoint": "prod", "session": "fz-session", "tool": "fz_tool"}


# The stubs type these extensions as plain FieldDescriptors.
_RESOURCE: Any = resource_pb2.resource
_REFERENCE: Any = resource_pb2.resource_reference


@functools.cache
def _resource_patterns() -> dict[str, str]:
    """Resource type (registry.corral.dev/Agent) -> an example name of it, from the messages'
    google.api.resource options."""
    pool = descriptor_pool.Default()
    examples: dict[str, str] = {}
    for file_name in ("corral/registry/v1/registry.proto", "corral/registry/v1/rollouts.proto",
                      "corral/registry/v1/tools.proto", "corral/registry/v1/keys.proto",
                      "corral/sessions/v1/sessions.proto"):
        for message in pool.FindFileByName(file_name).message_types_by_name.values():
            options: MessageOptions = message.GetOptions()
            if options.HasExtension(_RESOURCE):
                resource = options.Extensions[_RESOURCE]
                pattern = resource.pattern[0]
                for part in re.findall(r"{(\w+)}", pattern):
                    pattern = pattern.replace(f"{{{part}}}", _PARTS.get(part, "1"))
                examples[resource.type] = pattern
    return examples


def _example_name(field: Any) -> str | None:
    """A well-formed name for a string field that holds one (by its resource reference, or as
    the name of a resource message), else None."""
    examples = _resource_patterns()
    options: FieldOptions = field.GetOptions()
    if options.HasExtension(_REFERENCE):
        ref = options.Extensions[_REFERENCE]
        if ref.type:
            return examples.get(ref.type)
        child = examples.get(ref.child_type)
        return child.rsplit("/", 2)[0] if child else None
    container = field.containing_type
    owner: MessageOptions | None = container.GetOptions() if container is not None else None
    if field.name == "name" and owner is not None and owner.HasExtension(_RESOURCE):
        return examples.get(owner.Extensions[_RESOURCE].type)
    return None


def _message(descriptor: Descriptor) -> Message:
    """A plausible message of `descriptor`: names and ids well-formed, the rest empty, so that
    the one hostile field of a case is what the service judges."""
    message = GetMessageClass(descriptor)()
    _fill(message, depth=2)
    return message


# Fields whose plausible value is not empty, by message and field name (or field name alone);
# `seed` adds the digests of what a test published.
_PLAUSIBLE: dict[str, object] = {
    "MetricSpec.name": "latency_p95",
    "TrafficTarget.percent": 100.0,
    "payload": b"{}",
    "content_type": "application/json",
    "score_name": "accuracy",
    "value": 0.5,
    "role": "viewer",
    "display_name": "fuzz",
    "address": "https://tools.example.com/fz",
    "trace_id": "0af7651916cd43dd8448eb211c80319c",
    "span_id": "b7ad6b7169203331",
    "RevokeKeyRequest.name": "fuzz",
}


def seed(parts: dict[str, str], values: dict[str, object]) -> None:
    """Makes plausible messages name what a test made (an agent, its endpoint, a session, a
    tool), so that one hostile field meets the code behind the names, not a NOT_FOUND."""
    _PARTS.update(parts)
    _PLAUSIBLE.update(values)
    _resource_patterns.cache_clear()


def _fill(message: Message, depth: int) -> None:
    for field in message.DESCRIPTOR.fields:
        if field.containing_oneof is not None and not field.containing_oneof.name.startswith("_"):
            continue  # one member of a real oneof is set below, if any
        known = _PLAUSIBLE.get(f"{message.DESCRIPTOR.name}.{field.name}", _PLAUSIBLE.get(field.name))
        if field.is_repeated:
            if field.message_type is not None and depth > 0 and not field.message_type.GetOptions().map_entry and field.message_type.full_name.startswith("corral."):
                _fill(getattr(message, field.name).add(), depth - 1)
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            example = _example_name(field)
            if isinstance(known, str):
                setattr(message, field.name, known)
            elif example is not None:
                setattr(message, field.name, example)
            elif isinstance(known, str):
                setattr(message, field.name, known)
            elif field.name.endswith("_id"):
                setattr(message, field.name, "fz1")
        elif known is not None and type(known) is type(getattr(message, field.name)):
            setattr(message, field.name, known)
        elif field.enum_type is not None and len(field.enum_type.values) > 1:
            setattr(message, field.name, field.enum_type.values[1].number)
        elif field.message_type is not None and depth > 0 and field.message_type.full_name.startswith("corral."):
            _fill(getattr(message, field.name), depth - 1)


def _hostile_values(field: FieldDescriptor, budget: bool) -> Iterator[tuple[str, object]]:
    """(label, value) pairs for one scalar or well-known field; `budget` allows the megabytes."""
    name = field.name
    if field.type == FieldDescriptor.TYPE_STRING:
        if name == "page_token":
            yield from ((f"token {t[:20]!r}", t) for t in PAGE_TOKENS)
        if name in ("name", "parent") or name.endswith(("_name", "version", "agent", "session")):
            yield from ((f"name {n[:30]!r}", n) for n in RESOURCE_NAMES)
        yield from ((f"string {s[:10]!r}", s) for s in STRINGS)
        yield "64 KiB string", MEDIUM_STRING
        if budget:
            yield "1 MB string", BIG_STRING
    elif field.type == FieldDescriptor.TYPE_BYTES:
        yield "garbage bytes", b"\xff\x00{not json"
        if budget:
            yield "5 MB bytes", BIG_BYTES
    elif field.type in _INTS:
        yield from ((f"int {v}", v) for v in _INTS[field.type])
    elif field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        yield from ((f"float {v}", v) for v in FLOATS)
    elif field.type == FieldDescriptor.TYPE_ENUM:
        yield "unknown enum 999", 999
        yield "negative enum", -7
    elif field.type == FieldDescriptor.TYPE_BOOL:
        yield "true", True


def _with(descriptor: Descriptor, path: tuple[FieldDescriptor, ...], value: object) -> Message:
    """A message of `descriptor` with the field at `path` set to `value` (a repeated field gets
    it as its one element, or 2,000 copies when value is a (value, count) request)."""
    top = _message(descriptor)
    message = top
    for step in path[:-1]:
        if step.is_repeated:
            message = getattr(message, step.name).add()
            _fill(message, depth=1)
        else:
            message = getattr(message, step.name)
    last = path[-1]
    if last.message_type is not None and last.message_type.full_name in (
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
    ):
        pair: tuple[int, int] = value  # type: ignore[assignment]
        seconds, nanos = pair
        target: Any = getattr(message, last.name)
        target = target.add() if last.is_repeated else target
        target.seconds = seconds
        target.nanos = nanos
    elif last.message_type is not None and last.message_type.GetOptions().map_entry:
        entries = getattr(message, last.name)
        key_field = last.message_type.fields_by_name["key"]
        value_field = last.message_type.fields_by_name["value"]
        for i in range(int(value)):  # type: ignore[call-overload]
            key: object = f"k{i}" if key_field.type == FieldDescriptor.TYPE_STRING else i
            if value_field.message_type is None:
                entries[key] = "v" if value_field.type == FieldDescriptor.TYPE_STRING else 0
            else:
                entries[key].SetInParent()
    elif last.is_repeated:
        items = getattr(message, last.name)
        if last.message_type is not None:
            for _ in range(int(value)):  # type: ignore[call-overload]
                items.add()
        else:
            items.append(value)
    else:
        setattr(message, last.name, value)
    return top


_SKIP = ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.Any")


def _field_cases(
    root: Descriptor,
    descriptor: Descriptor,
    prefix: tuple[FieldDescriptor, ...],
    depth: int,
    budget: set[int],
) -> Iterator[tuple[str, Message]]:
    """Messages of `root` with one field of `descriptor` (reached from root by `prefix`) hostile."""
    for field in descriptor.fields:
        path = (*prefix, field)
        label = ".".join(f.name for f in path)
        kind = field.message_type.full_name if field.message_type is not None else ""
        if kind in _SKIP:
            continue
        if kind == "google.protobuf.Timestamp":
            for stamp in TIMESTAMPS:
                yield f"{label}={stamp} (timestamp)", _with(root, path, stamp)
        elif kind == "google.protobuf.Duration":
            for span in DURATIONS:
                yield f"{label}={span} (duration)", _with(root, path, span)
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            yield f"{label}: 20,000 entries", _with(root, path, 20_000)
        elif field.message_type is not None:
            if field.is_repeated:
                yield f"{label}: 5,000 empty elements", _with(root, path, 5_000)
            if depth > 0:
                yield from _field_cases(root, field.message_type, path, depth - 1, budget)
        else:
            # The megabyte values once per message type and kind (string, bytes), to keep the
            # run short: `budget` holds the kinds not yet sent big.
            big = field.type in budget
            budget.discard(field.type)
            for what, value in _hostile_values(field, big):
                yield f"{label}={what}", _with(root, path, value)
            if field.is_repeated:
                many = _message(root)
                target = many
                for step in path[:-1]:
                    target = getattr(target, step.name)
                    if step.is_repeated:
                        target = target.add()
                filler = "x" if field.type == FieldDescriptor.TYPE_STRING else None
                if filler is not None:
                    getattr(target, field.name).extend([filler] * 20_000)
                    yield f"{label}: 20,000 elements", many


def message_cases(descriptor: Descriptor) -> list[tuple[str, bytes]]:
    """The hostile messages of one type: empty, plausible, and plausible but for one field at a
    time (three levels deep)."""
    cases = [("empty message", b""), ("plausible message", _message(descriptor).SerializeToString())]
    for what, message in _field_cases(
        descriptor, descriptor, (), 3, {FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES}
    ):
        cases.append((what, message.SerializeToString()))
    return cases


def wire_cases(descriptor: Descriptor) -> list[tuple[str, bytes]]:
    """Bytes that are not a message of `descriptor`: garbage, truncated, and invalid UTF-8 in a
    string field."""
    cases = [
        ("garbage bytes", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"),
        ("truncated length-delimited field", b"\x0a\x64abc"),
        ("end-group tag", b"\x0c"),
        ("field number zero", b"\x00\x01"),
    ]
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            tag = (field.number << 3) | 2
            cases.append((f"{field.name}: invalid UTF-8", bytes([tag]) + b"\x02\xc3\x28"))
            break
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.fields:
            # A valid nested message cut short.
            tag = (field.number << 3) | 2
            cases.append((f"{field.name}: truncated nested message", bytes([tag]) + b"\x05\x0a\x03ab"))
            break
    return cases


def cases_for(method: MethodDescriptor) -> list[Case]:
    """Every hostile request for `method`: single messages, and for request streams, sequences."""
    descriptor = method.input_type
    singles = [*wire_cases(descriptor), *message_cases(descriptor)]
    if not method.client_streaming:
        return [Case(what, (raw,)) for what, raw in singles]
    cases = [Case("no messages", ())]
    cases += [Case(what, (raw,)) for what, raw in singles]
    # A plausible first message then garbage, and the same message twice.
    first = _message(descriptor).SerializeToString()
    cases.append(Case("a message then garbage bytes", (first, b"\xff\xff\xff")))
    for what, raw in singles[: len(singles) // 2]:
        cases.append(Case(f"twice: {what}", (raw, raw)))
    # The kinds of message a stream takes (the members of its oneof), in the wrong orders: the
    # second kind first, the first kind twice, the first kind after the second.
    kinds = _oneof_members(descriptor)
    if len(kinds) >= 2:
        (a_name, a), (b_name, b) = kinds[:2]
        cases += [
            Case(f"{b_name} before any {a_name}", (b, b)),
            Case(f"{a_name} twice", (a, a, b)),
            Case(f"{a_name}, {b_name}, then {a_name} again", (a, b, a)),
            Case(f"{a_name}, then an empty message", (a, b"")),
        ]
    return cases


def _oneof_members(descriptor: Descriptor) -> list[tuple[str, bytes]]:
    """A plausible message of `descriptor` with each member of its first oneof set in turn."""
    oneofs = [o for o in descriptor.oneofs if not o.name.startswith("_")]
    if not oneofs:
        return []
    members = []
    for field in oneofs[0].fields:
        message = _message(descriptor)
        if field.message_type is not None:
            _fill(getattr(message, field.name), depth=1)
            getattr(message, field.name).SetInParent()
        elif field.type == FieldDescriptor.TYPE_BYTES:
            setattr(message, field.name, b"chunk")
        members.append((field.name, message.SerializeToString()))
    return members
