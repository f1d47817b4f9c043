"""Server interceptor that turns every failure into a meaningful status: never UNKNOWN."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from services.common.background import TaskSet
from services.common.errors import CorralError
from services.common.status import domain_error, from_rpc_error, to_status

log = logging.getLogger(__name__)

# Handlers of every method pass through here, whatever their message types.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


Wrap: TypeAlias = Callable[[Callable[..., Any]], Callable[..., Any]]
# What an exception that is no domain error stands for, if anything (the host passes
# services/common/store_errors.py's, kept out of this module so that servicers, which import it,
# import no database driver).
Translate: TypeAlias = Callable[[Exception], CorralError | None]


def _untranslated(_exc: Exception) -> CorralError | None:
    return None


def rewrapped(handler: Handler, unary: Wrap, streaming: Wrap) -> Handler:
    """`handler` with its behaviour wrapped: by `unary` when it answers once, by `streaming`
    when it streams its answers."""
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


class WrappedHandlers:
    """An interceptor's wrapped handler per method, made on the method's first call: the
    server's handlers do not change, and wrapping them on every call costs each call."""

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[Handler, Handler]] = {}

    def get(self, method: str, handler: Handler, wrap: Callable[[], Handler]) -> Handler:
        known = self._by_method.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = wrap()
        self._by_method[method] = (handler, wrapped)
        return wrapped


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that wraps each method's handler once (`_wrap`), on its first call."""

    def __init__(self) -> None:
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        return self._wrapped.get(method, handler, lambda: self._wrap(handler, method))

    def _wrap(self, handler: Handler, method: str) -> Handler:
        raise NotImplementedError


class ErrorMappingInterceptor(WrappingInterceptor):
    """Maps domain errors (and what `translate` turns into one: a store's failure) to status
    codes, forwards downstream gRPC errors, and turns anything unexpected into INTERNAL (logged
    with its traceback) instead of UNKNOWN."""

    def __init__(self, domain: str, translate: Translate = _untranslated) -> None:
        super().__init__()
        self._domain = domain
        self._translate = translate

    async def _fail(self, exc: Exception, context: Context, method: str) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc  # the handler aborted with a status of its own choosing
        error = domain_error(exc)
        if error is None:
            error = self._translate(exc)
            if error is not None:  # a store outage: the operator's to see, not only the caller's
                log.warning("%s failed: %s", method, error.message)
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

    def _wrap(self, handler: Handler, method: str) -> Handler:
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

        return rewrapped(handler, unary, streaming)


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

