"""Following the registry's endpoints: its WatchEndpoints stream (a snapshot, then every change),
opened again with backoff whenever it breaks. Routers cache endpoints from it; executors choose
from it the versions to keep warm."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from corral.registry.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)


async def follow_endpoints(
    stub: registry_pb2_grpc.RegistryServiceStub,
    on_message: Callable[[registry_pb2.WatchEndpointsResponse], Awaitable[None]],
    on_lost: Callable[[], None],
    *,
    first_backoff_s: float = 0.1,
    max_backoff_s: float = 5.0,
) -> None:
    """Runs until cancelled: `on_message` gets each message (the first of every connection is a
    snapshot of all endpoints); `on_lost` is called when the stream breaks, before the retry."""
    backoff = first_backoff_s
    while True:
        try:
            async for msg in stub.WatchEndpoints(registry_pb2.WatchEndpointsRequest()):
                await on_message(msg)
                if msg.snapshot:
                    backoff = first_backoff_s
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            log.warning("endpoint watch lost (%s); reconnecting in %.1fs", exc.code().name, backoff)
        except Exception:
            log.exception("endpoint watch failed; reconnecting in %.1fs", backoff)
        on_lost()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff_s)
