"""The registry's storage in PostgreSQL, the only package that speaks SQL: one module per kind of
row (catalog, endpoints, runs, tools, keys, audit), read and written through the pool or through one
transaction's connection."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg

from services.registry.store.audit import AuditRows
from services.registry.store.catalog import CatalogRows
from services.registry.store.endpoints import ENDPOINTS_CHANNEL, EndpointRows
from services.registry.store.keys import KeyRows
from services.registry.store.lifecycle import DELETIONS_CHANNEL, LifecycleRows
from services.registry.store.runs import RunRows
from services.registry.store.tools import ToolRows


class Tx(CatalogRows, EndpointRows, RunRows, ToolRows, KeyRows, AuditRows, LifecycleRows):
    """Every table's rows over one transaction's connection."""


class PgStore(CatalogRows, EndpointRows, RunRows, ToolRows, KeyRows, AuditRows, LifecycleRows):
    """Every table's rows over the pool, and transactions."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self._pool = pool

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[Tx]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield Tx(conn)

    async def listen_endpoints(
        self, callback: Callable[[str], None]
    ) -> Callable[[], Awaitable[None]]:
        return await self._listen(ENDPOINTS_CHANNEL, callback)

    async def listen_deletions(
        self, callback: Callable[[str], None]
    ) -> Callable[[], Awaitable[None]]:
        return await self._listen(DELETIONS_CHANNEL, callback)

    async def _listen(
        self, channel: str, callback: Callable[[str], None]
    ) -> Callable[[], Awaitable[None]]:
        conn = await self._pool.acquire()

        def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            callback(str(payload))

        await conn.add_listener(channel, on_notify)

        async def close() -> None:
            try:
                await conn.remove_listener(channel, on_notify)
            finally:
                await self._pool.release(conn)

        return close


__all__ = ["PgStore", "Tx"]
