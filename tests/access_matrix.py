"""Every method Corral serves, read from the proto descriptors, with a request for each built from
the descriptors too: string fields that reference a resource name the given tenant's resource of
that type, resource messages carry its name. The access-matrix test calls each method so, with
credentials of every kind, and a method added to a contract is covered without a line here."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from google.api import field_behavior_pb2, resource_pb2
from google.protobuf import descriptor, message, message_factory

from services.common.auth.methods import METHODS, Access

# Contracts each service serves, by package (identity is served by every service: WhoAmI).
PACKAGES = {
    "corral.router.v1": "router",
    "corral.registry.v1": "registry",
    "corral.sessions.v1": "sessions",
    "corral.executor.v1": "executor",
    "corral.telemetry.v1": "telemetry",
    "corral.identity.v1": "registry",
    "opentelemetry.proto.collector.trace.v1": "telemetry",
    "opentelemetry.proto.collector.logs.v1": "telemetry",
}
_MODULES = (
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
    "opentelemetry.proto.collector.logs.v1.logs_service_pb2",
)

FieldType = descriptor.FieldDescriptor


@dataclass(frozen=True)
class Method:
    """One RPC as the descriptors describe it, and what the access table says it needs."""

    path: str  # /package.Service/Method
    descriptor: descriptor.MethodDescriptor
    access: Access
    service: str  # the Corral service that serves it

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]

    @property
    def id(self) -> str:
        """A test id: Service.Method."""
        return self.path.strip("/").rsplit(".", 1)[1].replace("/", ".")

    @property
    def public(self) -> bool:
        return self.access.role is not None and not (self.access.open or self.access.any_principal)

    @property
    def internal(self) -> bool:
        return self.access.role is None and bool(self.access.services)

    def request_class(self) -> type[message.Message]:
        return message_factory.GetMessageClass(self.descriptor.input_type)

    def response_class(self) -> type[message.Message]:
        return message_factory.GetMessageClass(self.descriptor.output_type)


def served_methods() -> list[Method]:
    """Every method of every service in Corral's served packages, sorted by path."""
    modules = list(_MODULES)
    for package in PACKAGES:
        if package.startswith("corral."):
            root = importlib.import_module(package)
            modules += [f"{package}.{info.name}" for info in pkgutil.iter_modules(root.__path__)
                        if info.name.endswith("_pb2")]
    methods = []
    for name in modules:
        pb2 = importlib.import_module(name)
        for svc in pb2.DESCRIPTOR.services_by_name.values():
            for rpc in svc.methods:
                path = f"/{svc.full_name}/{rpc.name}"
                methods.append(Method(path, rpc, METHODS[path], PACKAGES[svc.file.package]))
    return sorted(methods, key=lambda m: m.path)


@dataclass(frozen=True)
class Resources:
    """A tenant's resources as requests name them: a name per resource type
    ("registry.corral.dev/Agent": "agents/x"), and values for fields no reference annotates."""

    tenant: str
    names: Mapping[str, str]
    # Values by field name, for fields the descriptors say nothing about (a session's etag).
    values: Mapping[str, Any] = field(default_factory=dict)

    def name_of(self, resource_type: str) -> str:
        return self.names[resource_type]

    def id_of(self, singular: str) -> str:
        """The last part of the name of the resource whose type is `singular` ("agent"), or ""."""
        for resource_type, name in self.names.items():
            if resource_type.rsplit("/", 1)[1].lower() == singular:
                return name.rsplit("/", 1)[1]
        return ""

    def parent_of(self, child_type: str) -> str:
        """The collection a `child_type` resource lives in: its name less the last two parts."""
        return self.names[child_type].rsplit("/", 2)[0]


def references(msg: message.Message) -> set[str]:
    """The names `msg` gives in fields that reference one resource (not a collection), at any
    depth."""
    found: set[str] = set()
    for f, value in msg.ListFields():
        if f.type == FieldType.TYPE_STRING and _reference(f)[0]:
            found.update(value if f.is_repeated else [value])
        elif f.message_type is not None and not f.message_type.GetOptions().map_entry:
            for inner in value if f.is_repeated else [value]:
                found |= references(inner)
    return found


def _option(options: message.Message, extension: descriptor.FieldDescriptor) -> object | None:
    """An extension option's value, or None. Matched by name: the googleapis stubs type their
    extensions as plain FieldDescriptors, which types-protobuf's Extensions[] does not take."""
    return next((v for f, v in options.ListFields() if f.full_name == extension.full_name), None)


def _required(f: descriptor.FieldDescriptor) -> bool:
    behaviors = _option(f.GetOptions(), field_behavior_pb2.field_behavior)
    return field_behavior_pb2.REQUIRED in (behaviors if isinstance(behaviors, Iterable) else [])


def _reference(f: descriptor.FieldDescriptor) -> tuple[str, str]:
    ref = _option(f.GetOptions(), resource_pb2.resource_reference)
    if isinstance(ref, resource_pb2.ResourceReference):
        return ref.type, ref.child_type
    return "", ""


def _resource_type(d: descriptor.Descriptor) -> str:
    resource = _option(d.GetOptions(), resource_pb2.resource)
    return resource.type if isinstance(resource, resource_pb2.ResourceDescriptor) else ""


def _descriptor(msg: message.Message) -> descriptor.Descriptor:
    return cast(descriptor.Descriptor, msg.DESCRIPTOR)


# Required values the descriptors cannot give a valid one for.
SCALARS: Mapping[str, Any] = {
    # A traffic split's or an experiment's percentages add up to 100: one target takes it all.
    "percent": 100.0,
    # A tool's address is host:port.
    "address": "tools.example.com:443",
}


def _scalar(f: descriptor.FieldDescriptor, resources: Resources) -> Any:
    """A value for a required field nothing annotates: the tenant's value for it if it has one,
    else the smallest valid-looking one."""
    if f.name in resources.values:
        return resources.values[f.name]
    if f.name in SCALARS:
        return SCALARS[f.name]
    if f.type == FieldType.TYPE_STRING:
        return resources.tenant if f.name == "tenant" else "x"
    if f.type == FieldType.TYPE_BYTES:
        return b"{}"
    if f.type == FieldType.TYPE_BOOL:
        return True
    if f.type == FieldType.TYPE_ENUM and f.enum_type is not None:
        return f.enum_type.values[-1].number  # the last: _UNSPECIFIED is always 0
    if f.type in (FieldType.TYPE_DOUBLE, FieldType.TYPE_FLOAT):
        return 0.5
    return 1


def fill(msg: message.Message, resources: Resources, depth: int = 0) -> message.Message:
    """Fills `msg` in place as a client naming `resources` would: every field that references a
    resource, every required field (recursively), the name of a resource message, and the first
    member of each top-level oneof nothing else chose. Returns `msg`."""
    d = _descriptor(msg)
    own_type = _resource_type(d)
    name_field = d.fields_by_name.get("name")
    if own_type and name_field is not None:
        setattr(msg, name_field.name, resources.name_of(own_type))
    for f in d.fields:
        ref_type, child_type = _reference(f)
        if f.type == FieldType.TYPE_STRING and (ref_type or child_type) and ref_type != "*":
            value = resources.name_of(ref_type) if ref_type else resources.parent_of(child_type)
            if f.is_repeated:
                getattr(msg, f.name).append(value)
            else:
                setattr(msg, f.name, value)
        elif f.type == FieldType.TYPE_STRING and f.name.endswith("_id") and (
                own := resources.id_of(f.name.removesuffix("_id"))):
            setattr(msg, f.name, own)  # a create naming the id of the tenant's own resource
        elif _required(f) or f.name in resources.values or _refers(f):
            _set(msg, f, resources, depth)
    for oneof in d.oneofs if depth == 0 else ():  # a stream's first message: its header
        if msg.WhichOneof(oneof.name) is None and oneof.fields:
            _set(msg, oneof.fields[0], resources, depth)
    return msg


def _refers(f: descriptor.FieldDescriptor) -> bool:
    """A message field outside any oneof whose own fields reference resources (a filter)."""
    if f.message_type is None or f.is_repeated or f.containing_oneof is not None:
        return False
    return any(any(_reference(inner)) for inner in f.message_type.fields)


def _set(msg: message.Message, f: descriptor.FieldDescriptor, resources: Resources, depth: int) -> None:
    if f.message_type is not None:
        if f.message_type.GetOptions().map_entry or depth > 4:
            return
        target = getattr(msg, f.name).add() if f.is_repeated else getattr(msg, f.name)
        if f.message_type.full_name.startswith("google.protobuf."):
            target.SetInParent()  # a Timestamp, Duration or FieldMask left at its zero
        else:
            fill(target, resources, depth + 1)
        return
    value = _scalar(f, resources)
    if f.is_repeated:
        getattr(msg, f.name).append(value)
    else:
        setattr(msg, f.name, value)


def request_for(method: Method, resources: Resources,
                overrides: Mapping[str, Any] | None = None) -> message.Message:
    """The request of `method` naming `resources`, with `overrides` (field → value) on top."""
    request = fill(method.request_class()(), resources)
    for name, value in (overrides or {}).items():
        if isinstance(value, message.Message):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


def stream_for(method: Method, resources: Resources,
               overrides: Mapping[str, Any] | None = None) -> list[message.Message]:
    """What a client sends `method`: its request; for a client stream whose messages are a oneof
    (a header, then a body: PublishVersion, Converse), one message per member, in order."""
    first = request_for(method, resources, overrides)
    oneofs = _descriptor(first).oneofs
    if not method.descriptor.client_streaming or not oneofs:
        return [first]
    stream = [first]
    for member in oneofs[0].fields[1:]:
        later = method.request_class()()
        _set(later, member, resources, 1)
        stream.append(later)
    return stream


Metadata = tuple[tuple[str, str], ...]


async def call(channel: grpc.aio.Channel, method: Method, requests: list[message.Message],
               metadata: Metadata = (), timeout: float = 10) -> message.Message | None:
    """Calls `method` with `requests` (the first alone unless the client streams): the response,
    or the first message of a response stream (None when the stream ends empty)."""
    request = requests[0]
    ser = type(request).SerializeToString
    de = method.response_class().FromString
    rpc = method.descriptor
    stream: grpc.aio.StreamStreamCall[Any, Any] | grpc.aio.UnaryStreamCall[Any, Any]
    if rpc.client_streaming and rpc.server_streaming:
        stream = channel.stream_stream(method.path, ser, de)(
            iter(requests), metadata=metadata, timeout=timeout)
    elif rpc.server_streaming:
        stream = channel.unary_stream(method.path, ser, de)(
            request, metadata=metadata, timeout=timeout)
    elif rpc.client_streaming:
        return await channel.stream_unary(method.path, ser, de)(
            iter(requests), metadata=metadata, timeout=timeout)
    else:
        return await channel.unary_unary(method.path, ser, de)(
            request, metadata=metadata, timeout=timeout)
    try:
        async for first in stream:
            return first
        return None
    finally:
        stream.cancel()


# What grpcio's asyncio client reports, in place of the server's status, when the server ends a
# client-streaming call before the client has written all its messages (grpc/grpc#36066): a
# write that fails after the status arrived overwrites it. The client's doing, so such a call is
# made again.
_CLIENT_WRITE_RACE = "Internal error from Core"
CLIENT_WRITE_RACE_TRIES = 20


async def outcome(channel: grpc.aio.Channel, method: Method, requests: list[message.Message],
                  metadata: Metadata = ()) -> tuple[grpc.StatusCode, message.Message | None, str]:
    """What `call` comes back with: (code, response or None, details)."""
    # On a loaded machine the race can win several times in a row: a short pause between tries
    # lets the next one be independent.
    for _ in range(CLIENT_WRITE_RACE_TRIES):
        try:
            response = await call(channel, method, requests, metadata)
        except grpc.aio.AioRpcError as err:
            raced = err.code() == grpc.StatusCode.INTERNAL and err.details() == _CLIENT_WRITE_RACE
            if raced and method.descriptor.client_streaming:
                await asyncio.sleep(0.05)
                continue
            return err.code(), None, err.details() or ""
        return grpc.StatusCode.OK, response, ""
    return grpc.StatusCode.INTERNAL, None, _CLIENT_WRITE_RACE
