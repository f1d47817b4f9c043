"""PostgreSQL through asyncpg: the pool (sized from settings, every acquire bounded in time),
ordered SQL migrations applied at start, and domain values read from rows."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from services.common.settings import StorePools

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger(__name__)
D = TypeVar("D", bound="DataclassInstance")


class DatabaseUnreachable(ConnectionError):
    """A connection to PostgreSQL could not be made (refused, reset, timed out)."""


class DatabasePoolExhausted(TimeoutError):
    """Every connection of the pool stayed busy for as long as a call may wait for one."""

    def __init__(self, max_size: int, waited_s: float) -> None:
        super().__init__(f"all {max_size} connections of the pool stayed busy for {waited_s:g} s")
        self.max_size = max_size
        self.waited_s = waited_s


class BoundedPool(asyncpg.Pool):
    """An asyncpg pool whose acquire waits at most `wait_s` (asyncpg's waits for ever) and says why
    it failed: every connection busy (DatabasePoolExhausted), or PostgreSQL not answering
    (DatabaseUnreachable). A connection found closed is replaced on the next acquire, so the pool
    recovers by itself once PostgreSQL is back."""

    def __init__(self, url: str, *, pools: StorePools) -> None:
        super().__init__(
            url,
            min_size=pools.db_min,
            max_size=pools.db_max,
            # How long connecting may take.
            timeout=pools.wait_s,
            # asyncpg.create_pool's defaults.
            max_queries=50000,
            max_inactive_connection_lifetime=300.0,
            loop=None,
            connection_class=asyncpg.Connection,
            record_class=asyncpg.Record,
        )
        self._wait_s = pools.wait_s

    async def _acquire(self, timeout: float | None) -> asyncpg.pool.PoolConnectionProxy:
        wait_s = self._wait_s if timeout is None else timeout
        try:
            # Private in asyncpg and its stubs; Pool.acquire and every Pool.fetch* go through it.
            proxy: asyncpg.pool.PoolConnectionProxy = await super()._acquire(wait_s)  # type: ignore[misc]
            return proxy
        except TimeoutError as exc:
            if self.get_idle_size() == 0 and self.get_size() >= self.get_max_size():
                raise DatabasePoolExhausted(self.get_max_size(), wait_s) from exc
            raise DatabaseUnreachable(f"no connection within {wait_s:g} s") from exc
        except OSError as exc:
            raise DatabaseUnreachable(f"{type(exc).__name__}: {exc}") from exc


@retry(
    retry=retry_if_exception_type((OSError, asyncpg.CannotConnectNowError)),
    wait=wait_exponential(multiplier=0.1, max=2),
    stop=stop_after_delay(30),
    reraise=True,
)
async def create_pool(url: str, pools: StorePools | None = None) -> asyncpg.Pool:
    # Connecting never reached the other side when it fails, so retrying is safe.
    pool = BoundedPool(url, pools=pools or StorePools())
    try:
        await pool
    except BaseException:
        pool.terminate()
        raise
    return pool


async def migrate(pool: asyncpg.Pool, service: str, directory: Path) -> list[str]:
    """Applies `NNNN_name.sql` files in order, each once, under an advisory lock so that several
    replicas starting together apply each migration exactly once. Returns the names applied."""
    applied: list[str] = []
    files = sorted(directory.glob("*.sql"))
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('corral_migrations'))")
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS public.corral_migrations (
                       service text NOT NULL,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now(),
                       PRIMARY KEY (service, name))"""
        )
        done = {
            r["name"]
            for r in await conn.fetch(
                "SELECT name FROM public.corral_migrations WHERE service = $1", service
            )
        }
        for f in files:
            if f.name in done:
                continue
            await conn.execute(f.read_text())
            await conn.execute(
                "INSERT INTO public.corral_migrations (service, name) VALUES ($1, $2)",
                service,
                f.name,
            )
            applied.append(f.name)
    if applied:
        log.info("%s: applied migrations %s", service, ", ".join(applied))
    return applied


def from_row(cls: type[D], row: asyncpg.Record | Mapping[str, Any], **converted: object) -> D:
    """A `cls` from the row's columns named like its fields, and `converted` for the fields
    whose column differs in name or type. Fields the row lacks take their defaults."""
    columns = set(row.keys())
    names = [f.name for f in dataclasses.fields(cls) if f.name in columns]
    return cls(**{name: row[name] for name in names if name not in converted}, **converted)
