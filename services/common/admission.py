"""A bound on the calls one service handles at once: past `CORRAL_MAX_CONCURRENT_RPCS` a call is
refused at once, RESOURCE_EXHAUSTED SERVER_BUSY with a retry delay, instead of waiting in a
queue that only grows (grpc's own `maximum_concurrent_rpcs` refuses with no ErrorInfo and no
RetryInfo). Health checks and reflection are never refused: a busy service is still alive."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from services.common.errors import ResourceExhausted
from services.common.interceptors import Context, Handler, WrappingInterceptor, rewrapped

REASON_SERVER_BUSY = "SERVER_BUSY"
BUSY_RETRY_S = 1.0
_NEVER_REFUSED = ("/grpc.health.", "/grpc.reflection.")


class ConcurrencyLimitInterceptor(WrappingInterceptor):
    """Counts the calls in flight (a stream until it ends) and refuses those beyond `limit`.
    Goes inside the error mapping, which turns the refusal into its status."""

    def __init__(self, service: str, limit: int) -> None:
        super().__init__()
        self._service, self.limit = service, limit
        self.in_flight = 0

    def _refusal(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"{self._service} is handling {self.in_flight} calls, the most it takes at once "
            f"(CORRAL_MAX_CONCURRENT_RPCS={self.limit}); retry after the delay given",
            reason=REASON_SERVER_BUSY, metadata={"limit": str(self.limit)},
            retry_delay_s=BUSY_RETRY_S,
        )

    def _admit(self) -> None:
        if self.in_flight >= self.limit:
            raise self._refusal()
        self.in_flight += 1

    def _wrap(self, handler: Handler, method: str) -> Handler:
        if method.startswith(_NEVER_REFUSED):
            return handler
        admit = self._admit

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: Context) -> Any:
                admit()
                try:
                    return await behavior(request, context)
                finally:
                    self.in_flight -= 1

            return run

        def streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: Context) -> AsyncIterator[Any]:
                admit()
                try:
                    async for item in behavior(request, context):
                        yield item
                finally:
                    self.in_flight -= 1

            return run

        return rewrapped(handler, unary, streaming)
