"""What every table's rows are read and written through: the pool (one statement each) or the
connection of a transaction (statements that commit together)."""

from __future__ import annotations

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from services.common.paging import Key, KeyPart

# A pool, a connection, or a pool's connection (what a transaction holds).
Db = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy


class Rows:
    def __init__(self, db: Db) -> None:
        self._db = db


def key_part(after: Key | None, index: int) -> KeyPart | None:
    """A part of a keyset position, or None on the first page (the SQL reads NULL as "from the
    start")."""
    return after[index] if after is not None else None
