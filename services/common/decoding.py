"""The server interceptor that judges a request's bytes before any handler sees them: bytes that
do not parse as the method's message, and strings no store can keep (NUL characters), are the
caller's error, INVALID_ARGUMENT, on every method and every message of a request stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from services.common.errors import InvalidArgument
from services.common.interceptors import Context, Handler


class _Undecodable:
    """Stands in for a request message that cannot be accepted as sent: a deserializer that
    raises fails the call before any interceptor runs, as UNKNOWN, so the refusal is carried to
    the handler's wrapper instead and raised there."""

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def nul_field(message: Message, prefix: str = "") -> str | None:
    """The path of the first string in `message` (at any depth, map keys included) that holds a
    NUL character, which neither PostgreSQL text nor JSON columns can store; None if there is
    none."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            nested = entry.fields_by_name["value"].message_type is not None
            for key, item in value.items():
                if isinstance(key, str) and "\0" in key:
                    return f"{path} (a key)"
                found = _nul_in(item, f"{path}[{key!r}]", nested)
                if found:
                    return found
        elif field.is_repeated:
            for i, item in enumerate(value):
                found = _nul_in(item, f"{path}[{i}]", entry is not None)
                if found:
                    return found
        else:
            found = _nul_in(value, path, entry is not None)
            if found:
                return found
    return None


def _nul_in(value: Any, path: str, is_message: bool) -> str | None:
    if is_message:
        return nul_field(value, f"{path}.")
    if isinstance(value, str) and "\0" in value:
        return path
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
        field = nul_field(message) if isinstance(message, Message) else None
        if field is not None:
            return _Undecodable(
                InvalidArgument.field(field, "contains a NUL character (U+0000), which no field accepts")
            )
        return message

    return decode


def _refuse(undecodable: _Undecodable) -> InvalidArgument:
    return undecodable.error


class RequestDecodingInterceptor(grpc.aio.ServerInterceptor):
    """Refuses request bytes that do not parse as the method's message, or that carry a NUL in a
    string, with INVALID_ARGUMENT: for unary requests and for every message of a request stream.
    Installed after the authentication, so an anonymous caller learns nothing but that it must
    authenticate."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler

        async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, _Undecodable):
                    raise _refuse(request)
                yield request

        # Each kind keeps its shape (coroutine or async generator): grpc.aio runs a plain
        # function in a thread.
        def unary_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: Context) -> Any:
                if isinstance(request, _Undecodable):
                    raise _refuse(request)
                return await behavior(request, context)

            return run

        def unary_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: Context) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    raise _refuse(request)
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
