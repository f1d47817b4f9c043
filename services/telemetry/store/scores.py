"""Scores in PostgreSQL, and the per-session observations a version comparison needs (from the
spans and the scores of the version's sessions)."""

from __future__ import annotations

import json

import asyncpg

from services.common.db import from_row
from services.common.errors import Internal
from services.common.paging import Key
from services.telemetry.analysis import SessionObservation
from services.telemetry.model import (
    NewScore,
    ObservationQuery,
    Score,
    ScoreFilter,
    ScoreSource,
    TenantScope,
)
from services.telemetry.store.sql import (
    INPUT_TOKENS,
    INVOCATION,
    IS_TOOL_CALL,
    OUTPUT_TOKENS,
    Where,
    tokens,
)


def _score(r: asyncpg.Record) -> Score:
    return from_row(Score, r, source=ScoreSource(r["source"]), user=r["user_id"])


def _observation(r: asyncpg.Record) -> SessionObservation:
    scores: dict[str, float] = json.loads(r["scores"]) if r["scores"] else {}
    return from_row(
        SessionObservation,
        r,
        latencies_ms=tuple(float(x) for x in r["latencies_ms"]),
        # A score is in [0, 1] when recorded; the mean of several stays there but for rounding.
        scores={k: min(1.0, max(0.0, float(v))) for k, v in scores.items()},
    )


class PgScoreStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def insert_score(self, score: NewScore) -> Score:
        row = await self._pool.fetchrow(
            """INSERT INTO telemetry.scores (session, trace_id, name, value, source, comment,
                                             agent, version, endpoint, tenant, user_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING *""",
            score.session,
            score.trace_id,
            score.name,
            score.value,
            score.source.value,
            score.comment,
            score.agent,
            score.version,
            score.endpoint,
            score.tenant,
            score.user,
        )
        if row is None:  # RETURNING always returns the row inserted
            raise Internal("storing a score returned no row")
        return _score(row)

    async def list_scores(
        self, tenant: TenantScope, where: ScoreFilter, after: Key | None, limit: int
    ) -> list[Score]:
        sql = Where.of_tenant(tenant)
        sql.equal("session", "" if where.session is None else where.session.name)
        sql.equal("version", "" if where.version is None else where.version.name)
        sql.equal("name", where.name)
        sql.page("create_time, id", after)
        records = await self._pool.fetch(
            f"SELECT * FROM telemetry.scores WHERE {sql.sql} "
            f"ORDER BY create_time DESC, id DESC LIMIT {sql.param(limit)}",
            *sql.args,
        )
        return [_score(r) for r in records]

    async def observations(self, query: ObservationQuery) -> list[SessionObservation]:
        # A session is (tenant, session): the same id in two tenants is two sessions.
        records = await self._pool.fetch(
            f"""WITH inv AS (
                    SELECT tenant, session, min(start_time) AS first_time,
                           count(*) AS invocations,
                           count(*) FILTER (WHERE status = 'ERROR') AS failed_invocations,
                           array_agg(duration_ms ORDER BY start_time) AS latencies_ms
                    FROM telemetry.spans
                    WHERE version = $1 AND {INVOCATION} AND start_time >= $2 AND start_time < $3
                      AND ($4 = '' OR endpoint = $4) AND session <> ''
                      AND ($6::text IS NULL OR tenant = $6)
                    GROUP BY tenant, session),
                other AS (
                    SELECT tenant, session,
                           count(*) FILTER (WHERE {IS_TOOL_CALL}) AS tool_calls,
                           count(*) FILTER (WHERE {IS_TOOL_CALL} AND status = 'ERROR')
                               AS tool_failures,
                           {tokens(f"coalesce({INPUT_TOKENS}, 0) + coalesce({OUTPUT_TOKENS}, 0)")}
                               AS tokens
                    FROM telemetry.spans
                    WHERE version = $1 AND NOT is_invocation AND platform AND start_time >= $2
                      AND start_time < $3
                      AND (tenant, session) IN (SELECT tenant, session FROM inv)
                    GROUP BY tenant, session),
                sc AS (
                    SELECT tenant, session, jsonb_object_agg(name, mean) AS scores FROM (
                        SELECT tenant, session, name, avg(value) AS mean FROM telemetry.scores
                        WHERE version = $1 AND name = ANY($5::text[])
                          AND (tenant, session) IN (SELECT tenant, session FROM inv)
                        GROUP BY tenant, session, name) s
                    GROUP BY tenant, session)
                SELECT inv.*, coalesce(other.tool_calls, 0) AS tool_calls,
                       coalesce(other.tool_failures, 0) AS tool_failures,
                       coalesce(other.tokens, 0) AS tokens, sc.scores
                FROM inv LEFT JOIN other USING (tenant, session)
                         LEFT JOIN sc USING (tenant, session)
                ORDER BY inv.first_time""",
            query.version.name,
            query.start,
            query.end,
            "" if query.endpoint is None else query.endpoint.name,
            list(query.score_names),
            query.tenant,
        )
        return [_observation(r) for r in records]
