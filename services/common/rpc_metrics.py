"""Every service's gRPC methods as Prometheus metrics: calls by status code and how long they
took, from the outermost interceptor, so the code is the one the caller saw."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Histogram

from services.common.interceptors import Context, Handler, WrappingInterceptor, rewrapped
from services.common.prometheus import LATENCY_BUCKETS_S


class RpcMetricsInterceptor(WrappingInterceptor):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.duration = Histogram(
            "corral_rpc_server_duration_seconds",
            "gRPC calls served, by method and status code (streams: until the last message).",
            ["method", "code"], registry=registry, buckets=LATENCY_BUCKETS_S)

    def _observe(self, method: str, context: Context, began: float, failure: BaseException | None) -> None:
        self.duration.labels(method, _code(context, failure)).observe(time.monotonic() - began)

    def _wrap(self, handler: Handler, full_method: str) -> Handler:
        observe, method = self._observe, full_method.lstrip("/")

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: Context) -> Any:
                began = time.monotonic()
                try:
                    response = await behavior(request, context)
                except BaseException as exc:
                    observe(method, context, began, exc)
                    raise
                observe(method, context, began, None)
                return response

            return run

        def streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: Context) -> AsyncIterator[Any]:
                began = time.monotonic()
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as exc:
                    observe(method, context, began, exc)
                    raise
                observe(method, context, began, None)

            return run

        return rewrapped(handler, unary, streaming)


# grpc.aio reports a set code as the number of the grpc.StatusCode.
_CODES = {code.value[0]: code.name for code in grpc.StatusCode}


def _code(context: Context, failure: BaseException | None) -> str:
    if isinstance(failure, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED.name
    code: object = context.code()  # typed StatusCode; grpc.aio gives its number
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int) and code in _CODES:
        return _CODES[code]
    if failure is not None:  # not aborted with a status: grpc ends the call UNKNOWN
        return grpc.StatusCode.UNKNOWN.name
    return grpc.StatusCode.OK.name
