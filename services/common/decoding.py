"""The server interceptor that judges a request's bytes before any handler sees them: bytes that
do not parse as the method's message, strings no store can keep (NUL characters), numbers that
are no value of their enum and fields over the limits their proto states (the
corral.options.v1.limits option) are the caller's error, INVALID_ARGUMENT naming the field, on
every method and every message of a request stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from functools import cache
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from corral.options.v1 import limits_pb2
from services.common.errors import InvalidArgument
from services.common.interceptors import Context, Handler, WrappingInterceptor


class _Undecodable:
    """Stands in for a request message that cannot be accepted as sent: a deserializer that
    raises fails the call before any interceptor runs, as UNKNOWN, so the refusal is carried to
    the handler's wrapper instead and raised there."""

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def refused_field(message: Message, prefix: str = "") -> tuple[str, str] | None:
    """The first field of `message` (at any depth, map keys included) that no request may carry,
    as (path, what is wrong): a field over the limits its proto states, a string with a NUL
    character, which neither PostgreSQL text nor JSON columns can store, or a number that is none
    of the values of a Corral enum (proto3 keeps unknown numbers, and code that maps them would
    fail). None if there is none."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        limits = limits_of(field)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            found = _over_count(limits, len(value), path)
            if found:
                return found
            for key, item in value.items():
                if isinstance(key, str) and "\0" in key:
                    return f"{path} (a key)", _NUL
                if limits is not None and limits.max_key_length and isinstance(key, str):
                    found = _over_length(limits.max_key_length, key, f"{path} (a key)")
                    if found:
                        return found
                found = _refused_value(value_field, limits, item, f"{path}[{key!r}]")
                if found:
                    return found
        elif field.is_repeated:
            found = _over_count(limits, len(value), path)
            if found:
                return found
            for i, item in enumerate(value):
                found = _refused_value(field, limits, item, f"{path}[{i}]")
                if found:
                    return found
        else:
            found = _refused_value(field, limits, value, path)
            if found:
                return found
    return None


@cache
def limits_of(field: FieldDescriptor) -> limits_pb2.FieldLimits | None:
    """The limits `field`'s proto states, None if it states none."""
    options = field.GetOptions()
    return options.Extensions[limits_pb2.limits] if options.HasExtension(limits_pb2.limits) else None


def _over_count(limits: limits_pb2.FieldLimits | None, count: int, path: str) -> tuple[str, str] | None:
    if limits is not None and limits.max_items and count > limits.max_items:
        return path, f"has {count} entries, over the limit of {limits.max_items}"
    return None


def _over_length(limit: int, value: str | bytes, path: str) -> tuple[str, str] | None:
    if len(value) <= limit:
        return None
    unit = "characters" if isinstance(value, str) else "bytes"
    return path, f"is {len(value)} {unit} long, over the limit of {limit} {unit}"


_NUL = "contains a NUL character (U+0000), which no field accepts"


def _refused_value(
    field: FieldDescriptor, limits: limits_pb2.FieldLimits | None, value: Any, path: str
) -> tuple[str, str] | None:
    if field.message_type is not None:
        if limits is not None and limits.max_size and value.ByteSize() > limits.max_size:
            return path, f"is {value.ByteSize()} bytes serialized, over the limit of {limits.max_size}"
        return refused_field(value, f"{path}.")
    if isinstance(value, str | bytes) and limits is not None and limits.max_length:
        found = _over_length(limits.max_length, value, path)
        if found:
            return found
    if isinstance(value, str):
        return (path, _NUL) if "\0" in value else None
    enum = field.enum_type
    if enum is not None and enum.full_name.startswith("corral.") and value not in enum.values_by_number:
        known = ", ".join(v.name for v in enum.values if v.number)
        return path, f"{value} is not a {enum.name}; use one of {known}"
    return None


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    # The message type, for the refusal; generated deserializers are bound FromString methods.
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    message_type = getattr(descriptor, "full_name", "the method's request message")

    def decode(raw: bytes) -> Any:
        try:
            message = deserializer(raw)
        except Exception:  # noqa: BLE001 - whatever the parser raises, the bytes are the caller's fault
            return _Undecodable(
                InvalidArgument(
                    f"the request is not a valid serialized {message_type} message (malformed "
                    "protobuf bytes, or a string that is not UTF-8); send the message the method "
                    "takes",
                    reason="MALFORMED_REQUEST",
                )
            )
        # Corral's own messages only: OTLP exports keep what their spans carry (NULs are
        # stripped where spans are stored, services/telemetry/otlp.py), so that one odd
        # attribute does not lose a whole batch of spans.
        refused = (
            refused_field(message)
            if isinstance(message, Message) and message_type.startswith("corral.")
            else None
        )
        if refused is not None:
            return _Undecodable(InvalidArgument.field(*refused))
        return message

    return decode


class RequestDecodingInterceptor(WrappingInterceptor):
    """Refuses request bytes that do not parse as the method's message, or that carry a field
    refused_field names, with INVALID_ARGUMENT: for unary requests and for every message of a
    request stream. Installed after the authentication, so an anonymous caller learns nothing but
    that it must authenticate."""

    def _wrap(self, handler: Handler, method: str) -> Handler:
        return _wrap(handler)


def _wrap(handler: Handler) -> Handler:
    """`handler` taking its requests through the tolerant decoder, raising its refusals."""

    async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Undecodable):
                raise request.error
            yield request

    # Each kind keeps its shape (coroutine or async generator): grpc.aio runs a plain
    # function in a thread.
    def unary_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: Context) -> Any:
            if isinstance(request, _Undecodable):
                raise request.error
            return await behavior(request, context)

        return run

    def unary_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: Context) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                raise request.error
            async for item in behavior(request, context):
                yield item

        return run

    def stream_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def run(requests: AsyncIterator[Any], context: Context) -> Any:
            return await behavior(checked(requests), context)

        return run

    def stream_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def run(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for item in behavior(checked(requests), context):
                yield item

        return run

    kinds = (
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler, unary_unary),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler, stream_unary),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler, unary_stream),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler, stream_stream),
    )
    for behavior, method_handler, wrap in kinds:
        if behavior:
            return method_handler(
                wrap(behavior),
                _tolerant(handler.request_deserializer),
                handler.response_serializer,
            )
    return handler
