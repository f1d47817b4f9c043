"""Server interceptor that turns every failure into a meaningful status: never UNKNOWN."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from services.common.background import TaskSet
from services.common.status import domain_error, from_rpc_error, to_status

log = logging.getLogger(__name__)

# Handlers of every method pass through here, whatever their message types.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes, forwards downstream gRPC errors, and turns anything
    unexpected into INTERNAL (logged with its traceback) instead of UNKNOWN."""

    def __init__(self, domain: str) -> None:
        self._domain = domain

    async def _fail(self, exc: Exception, context: Context, method: str) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc  # the handler aborted with a status of its own choosing
        error = domain_error(exc)
        if error is None and isinstance(exc, grpc.aio.AioRpcError):
            # A call to another service failed outside a clients module: pass its status on.
            error = from_rpc_error(exc, "a service it depends on")
        if error is not None:
            await context.abort_with_status(to_status(error, self._domain))
        log.exception("unexpected error in %s", method, exc_info=exc)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error in {self._domain} ({type(exc).__name__}); see the service log",
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        fail = self._fail

        # Cancellation is a BaseException and passes through; everything else is mapped here,
        # the one place that catches all.
        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: Context) -> Any:
                try:
                    return await behavior(request, context)
                except Exception as exc:  # noqa: BLE001
                    await fail(exc, context, method)

            return run

        def streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: Context) -> AsyncIterator[Any]:
                try:
                    async for item in behavior(request, context):
                        yield item
                except Exception as exc:  # noqa: BLE001
                    await fail(exc, context, method)

            return run

        kinds = (
            (handler.unary_unary, grpc.unary_unary_rpc_method_handler, unary),
            (handler.stream_unary, grpc.stream_unary_rpc_method_handler, unary),
            (handler.unary_stream, grpc.unary_stream_rpc_method_handler, streaming),
            (handler.stream_stream, grpc.stream_stream_rpc_method_handler, streaming),
        )
        for behavior, method_handler, wrap in kinds:
            if behavior:
                return method_handler(
                    wrap(behavior), handler.request_deserializer, handler.response_serializer
                )
        return handler


_closing = TaskSet("closing a finished stream")


def close_when_done(context: Context, stream: AsyncGenerator[Any, None]) -> None:
    """Closes a streaming handler's generator as soon as its RPC ends. When the caller goes away
    while the handler is parked at a `yield` (the server writing its last message), no
    CancelledError reaches it, and its clean-up (cancelling the calls it made, releasing what it
    holds) would otherwise wait until the generator is garbage-collected."""

    async def close() -> None:
        try:
            await stream.aclose()
        except RuntimeError:
            pass  # still running: the RPC's cancellation reaches it where it awaits

    def on_done(_context: Context) -> None:
        _closing.spawn(close())

    # The stubs declare the callback as a class rather than a callable Protocol.
    context.add_done_callback(on_done)  # type: ignore[arg-type]

