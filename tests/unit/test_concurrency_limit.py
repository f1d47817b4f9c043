"""The bound on calls a service handles at once (services/common/admission.py): the call beyond
it is refused at once with SERVER_BUSY and a retry delay, and health checks never are."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.common.admission import ConcurrencyLimitInterceptor
from services.common.errors import ResourceExhausted

pytestmark = pytest.mark.timeout(10)


async def test_calls_beyond_the_limit_are_refused_until_one_ends() -> None:
    release = asyncio.Event()

    async def slow(request: Any, context: Any) -> str:
        await release.wait()
        return "done"

    limit = ConcurrencyLimitInterceptor("router", 2)
    handler = limit._wrap(grpc.unary_unary_rpc_method_handler(slow), "/corral.X/Slow")
    running = [asyncio.ensure_future(handler.unary_unary(None, None)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted, match="CORRAL_MAX_CONCURRENT_RPCS=2") as refused:
        await handler.unary_unary(None, None)
    assert refused.value.reason == "SERVER_BUSY" and refused.value.retry_delay_s
    release.set()
    assert await asyncio.gather(*running) == ["done", "done"]
    assert limit.in_flight == 0
    assert await handler.unary_unary(None, None) == "done"


async def test_a_stream_counts_until_it_ends_and_health_checks_are_never_refused() -> None:
    async def stream(request: Any, context: Any) -> AsyncIterator[int]:
        yield 1
        yield 2

    async def check(request: Any, context: Any) -> str:
        return "SERVING"

    limit = ConcurrencyLimitInterceptor("router", 1)
    streaming = limit._wrap(grpc.unary_stream_rpc_method_handler(stream), "/corral.X/Watch")
    health = limit._wrap(grpc.unary_unary_rpc_method_handler(check), "/grpc.health.v1.Health/Check")
    items = streaming.unary_stream(None, None)
    assert await items.__anext__() == 1
    with pytest.raises(ResourceExhausted):
        await streaming.unary_stream(None, None).__anext__()
    assert await health.unary_unary(None, None) == "SERVING"
    assert [i async for i in items] == [2]
    assert limit.in_flight == 0
