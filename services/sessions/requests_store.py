"""The results of turns committed under request ids, in PostgreSQL (sessions.turn_requests). They
are written by the turn's commit itself (store.py, in the same statement); this module reads
them and deletes the expired."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from services.common.db import from_row
from services.sessions.model import SessionKey, TurnResult


class PgTurnResults:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def get(self, session: SessionKey, request_id: str, since: datetime) -> TurnResult | None:
        row = await self._pool.fetchrow(
            """SELECT turn, output, content_type, version, invocation_id, trace_id, commit_time,
                      request_digest
               FROM sessions.turn_requests
               WHERE tenant = $1 AND session_id = $2 AND request_id = $3 AND commit_time >= $4""",
            session.tenant, session.id, request_id, since,
        )
        if row is None:
            return None
        return from_row(TurnResult, row, output=bytes(row["output"]), digest=row["request_digest"])

    async def delete_before(self, cutoff: datetime) -> int:
        deleted = await self._pool.fetchval(
            """WITH gone AS (DELETE FROM sessions.turn_requests WHERE commit_time < $1 RETURNING 1)
               SELECT count(*) FROM gone""",
            cutoff,
        )
        return int(deleted or 0)
