"""The registry's storage in PostgreSQL, the only package that speaks SQL: one module per kind of
row (catalog, endpoints, runs, tools, keys, audit), read and written through the pool or through one
transaction's connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import asyncpg

from services.registry.store.audit import AuditRows
from services.registry.store.catalog import CatalogRows
from services.registry.store.endpoints import ENDPOINTS_CHANNEL, EndpointRows
from services.registry.store.keys import KeyRows
from services.registry.store.lifecycle import DELETIONS_CHANNEL, LifecycleRows
from services.registry.store.runs import RunRows
from services.registry.store.tools import ToolRows

# How long a liveness probe or a release of the listening connection may take.
PROBE_TIMEOUT_S = 2.0
# The application_name of the connection that listens for endpoint changes.
WATCH_APPLICATION = "corral-registry-watch"


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
        self,
        on_change: Callable[[str], None],
        on_deletion: Callable[[str], None],
        on_lost: Callable[[], None],
    ) -> PgListener:
        conn = await self._pool.acquire()
        listener = PgListener(self._pool, conn, {ENDPOINTS_CHANNEL: on_change, DELETIONS_CHANNEL: on_deletion})
        try:
            # Named, so an operator sees it in pg_stat_activity (a release resets the name).
            await conn.execute(f"SET application_name = '{WATCH_APPLICATION}'")
            for channel in listener.channels:
                await conn.add_listener(channel, listener.on_notify)
        except BaseException:
            await listener.close()
            raise
        conn.add_termination_listener(lambda _conn: on_lost())
        return listener


class PgListener:
    """One pooled connection held for LISTEN on some channels."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        conn: asyncpg.pool.PoolConnectionProxy,
        callbacks: Mapping[str, Callable[[str], None]],
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._callbacks = dict(callbacks)
        self.channels = tuple(callbacks)

    def on_notify(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        self._callbacks[channel](str(payload))

    async def alive(self) -> bool:
        if self._conn.is_closed():
            return False
        try:
            await asyncio.wait_for(self._conn.fetchval("SELECT 1"), PROBE_TIMEOUT_S)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        return True

    async def close(self) -> None:
        try:
            for channel in self.channels:
                if not self._conn.is_closed():
                    await asyncio.wait_for(
                        self._conn.remove_listener(channel, self.on_notify), PROBE_TIMEOUT_S
                    )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass
        finally:
            try:
                await self._pool.release(self._conn, timeout=PROBE_TIMEOUT_S)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self._conn.terminate()


__all__ = ["PgListener", "PgStore", "Tx"]
