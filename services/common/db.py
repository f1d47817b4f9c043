"""PostgreSQL through asyncpg: the pool, ordered SQL migrations applied at start, and domain
values read from rows."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger(__name__)
D = TypeVar("D", bound="DataclassInstance")


@retry(
    retry=retry_if_exception_type((OSError, asyncpg.CannotConnectNowError)),
    wait=wait_exponential(multiplier=0.1, max=2),
    stop=stop_after_delay(30),
    reraise=True,
)
async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    # Connecting never reached the other side when it fails, so retrying is safe.
    pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size)
    assert pool is not None
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
