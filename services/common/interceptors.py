"""Server interceptor that turns every failure into a meaningful status: never UNKNOWN."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.common.errors import CorralError, to_status

log = logging.getLogger(__name__)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes, forwards downstream gRPC errors, and turns anything
    unexpected into INTERNAL (logged with its traceback) instead of UNKNOWN."""

    def __init__(self, domain: str) -> None:
        self._domain = domain

    async def _fail(self, exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
        if isinstance(exc, CorralError):
            await context.abort_with_status(to_status(exc, self._domain))
        if isinstance(exc, grpc.aio.AioRpcError):
            # A downstream service failed: pass its status on unchanged, details included.
            code = exc.code()
            if code == grpc.StatusCode.UNKNOWN:
                code = grpc.StatusCode.INTERNAL
            details = exc.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE:
                details = f"{self._domain}: a service it depends on is unavailable: {details}"
            await context.abort(code, details, tuple(exc.trailing_metadata() or ()))
        log.exception("unexpected error in %s", method, exc_info=exc)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error in {self._domain} ({type(exc).__name__}); see the service log",
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        fail = self._fail

        def wrap_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behavior(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001 - this is the one place that catches all
                    await fail(exc, context, method)

            return run

        def wrap_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for item in behavior(request, context):
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await fail(exc, context, method)

            return run

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                wrap_stream(handler.stream_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler


_closing: set[asyncio.Task[None]] = set()


def close_when_done(context: grpc.aio.ServicerContext, stream: AsyncGenerator[Any, None]) -> None:
    """Closes a streaming handler's generator as soon as its RPC ends. When the caller goes away
    while the handler is parked at a `yield` (the server writing its last message), no
    CancelledError reaches it, and its clean-up (cancelling the calls it made, releasing what it
    holds) would otherwise wait until the generator is garbage-collected."""

    async def close() -> None:
        try:
            await stream.aclose()
        except RuntimeError:
            pass  # still running: the RPC's cancellation reaches it where it awaits

    def on_done(_context: object) -> None:
        task = asyncio.ensure_future(close())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    context.add_done_callback(on_done)
