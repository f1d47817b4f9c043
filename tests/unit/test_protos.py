"""The contracts keep their rules: every RPC says what it does and how it fails, every message
and enum says what it is, every field a caller sends says whether it is required, and every
resource reference names a resource the contracts define. Read from protoc's descriptors with
source info, so a new contract that skips a rule fails here."""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType

import pytest
from google.api import field_behavior_pb2, resource_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

ROOT = pathlib.Path(__file__).resolve().parents[2]
FieldBehavior = field_behavior_pb2.FieldBehavior


# Paths in FileDescriptorProto.source_code_info (descriptor.proto's field numbers).
_MESSAGE, _ENUM, _SERVICE = 4, 5, 6
_NESTED_MESSAGE, _NESTED_ENUM, _METHOD = 3, 4, 2


@dataclass(frozen=True)
class Contracts:
    """Corral's messages by full name; the comment above each service, message and enum; and
    each method with its full name and comment."""

    messages: dict[str, descriptor_pb2.DescriptorProto]
    comments: dict[str, str]
    methods: list[tuple[str, descriptor_pb2.MethodDescriptorProto, str]]


def _genproto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("genproto", ROOT / "scripts" / "genproto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _walk(
    file: descriptor_pb2.FileDescriptorProto,
    comments: dict[tuple[int, ...], str],
    scope: str,
    messages: list[descriptor_pb2.DescriptorProto],
    path: tuple[int, ...],
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto | None, str]]:
    """(full name, the message or None for an enum, its leading comment), nested ones too."""
    message_tag = _NESTED_MESSAGE if path else _MESSAGE
    for i, message in enumerate(messages):
        here = (*path, message_tag, i)
        name = f"{scope}.{message.name}"
        if not message.options.map_entry:
            yield name, message, comments.get(here, "")
        yield from _walk(file, comments, name, list(message.nested_type), here)
        for j, enum in enumerate(message.enum_type):
            yield f"{name}.{enum.name}", None, comments.get((*here, _NESTED_ENUM, j), "")
    if not path:
        for j, enum in enumerate(file.enum_type):
            yield f"{scope}.{enum.name}", None, comments.get((_ENUM, j), "")


@pytest.fixture(scope="module")
def contracts(tmp_path_factory: pytest.TempPathFactory) -> Contracts:
    out = tmp_path_factory.mktemp("protos") / "corral.binpb"
    _genproto().write_descriptor_set(out)
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}
    comments: dict[str, str] = {}
    methods = []
    for file in descriptor_set.file:
        if not file.name.startswith("corral/"):
            continue
        located = {
            tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location
        }
        top_level = list(file.message_type)
        for name, message, comment in _walk(file, located, file.package, top_level, ()):
            comments[name] = comment
            if message is not None:
                messages[name] = message
        for s, service in enumerate(file.service):
            comments[f"{file.package}.{service.name}"] = located.get((_SERVICE, s), "")
            for m, method in enumerate(service.method):
                comment = located.get((_SERVICE, s, _METHOD, m), "")
                methods.append((f"{file.package}.{service.name}.{method.name}", method, comment))
    return Contracts(messages, comments, methods)


def _option(options: Message, extension: FieldDescriptor) -> object | None:
    """An extension option's value, or None. Matched by name: the googleapis stubs type their
    extensions as plain FieldDescriptors, which types-protobuf's Extensions[] does not take."""
    return next((v for f, v in options.ListFields() if f.full_name == extension.full_name), None)


def _behaviors(field: descriptor_pb2.FieldDescriptorProto) -> list[int]:
    value = _option(field.options, field_behavior_pb2.field_behavior)
    return list(value) if isinstance(value, Iterable) else []


def _resource(message: descriptor_pb2.DescriptorProto) -> resource_pb2.ResourceDescriptor | None:
    value = _option(message.options, resource_pb2.resource)
    return value if isinstance(value, resource_pb2.ResourceDescriptor) else None


def _reference(field: descriptor_pb2.FieldDescriptorProto) -> resource_pb2.ResourceReference | None:
    value = _option(field.options, resource_pb2.resource_reference)
    return value if isinstance(value, resource_pb2.ResourceReference) else None


def test_every_rpc_says_what_it_does_and_how_it_fails(contracts: Contracts) -> None:
    assert contracts.methods
    undocumented = [name for name, _, comment in contracts.methods if "Errors" not in comment]
    assert not undocumented, f"RPCs without a comment listing their Errors: {undocumented}"


def test_every_service_message_and_enum_says_what_it_is(contracts: Contracts) -> None:
    missing = [n for n, comment in contracts.comments.items() if not comment]
    assert not missing, f"no comment above: {missing}"


def test_every_field_a_caller_sends_has_a_field_behavior(contracts: Contracts) -> None:
    """From each RPC's request, through every message it carries except output-only ones, and
    every field of every resource."""
    to_check = [method.input_type.lstrip(".") for _, method, _ in contracts.methods]
    to_check += [name for name, m in contracts.messages.items() if _resource(m) is not None]
    seen: set[str] = set()
    missing = []
    while to_check:
        name = to_check.pop()
        if name in seen or name not in contracts.messages:
            continue  # google.protobuf types, and messages of other packages' services
        seen.add(name)
        for field in contracts.messages[name].field:
            behaviors = _behaviors(field)
            if not behaviors:
                missing.append(f"{name}.{field.name}")
            carried = contracts.messages.get(field.type_name.lstrip("."))
            if carried is not None and not carried.options.map_entry and (
                FieldBehavior.OUTPUT_ONLY not in behaviors
            ):
                to_check.append(field.type_name.lstrip("."))
    assert not missing, f"fields a caller sends without google.api.field_behavior: {missing}"


def test_resources_are_named_by_an_identifier(contracts: Contracts) -> None:
    resources = {n: m for n, m in contracts.messages.items() if _resource(m) is not None}
    assert {
        "corral.registry.v1.Agent", "corral.registry.v1.Version", "corral.registry.v1.Endpoint",
        "corral.registry.v1.Rollout", "corral.registry.v1.Experiment", "corral.registry.v1.Tool",
        "corral.sessions.v1.Session",
    } <= set(resources)
    for name, message in resources.items():
        name_field = next(f for f in message.field if f.name == "name")
        assert _behaviors(name_field) == [FieldBehavior.IDENTIFIER], name
        descriptor = _resource(message)
        assert descriptor is not None and descriptor.pattern and descriptor.type, name


def test_resource_references_name_resources_the_contracts_define(contracts: Contracts) -> None:
    types = {r.type for m in contracts.messages.values() if (r := _resource(m)) is not None}
    dangling = []
    for name, message in contracts.messages.items():
        for field in message.field:
            ref = _reference(field)
            if ref is None:
                continue
            target = ref.type or ref.child_type
            if target != "*" and target not in types:
                dangling.append(f"{name}.{field.name} -> {target}")
    assert not dangling, f"references to undefined resource types: {dangling}"
