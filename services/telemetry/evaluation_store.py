"""SQL for scores and for the per-session observations a version comparison needs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.telemetry.analysis import SessionObservation
from services.telemetry.spans import TOOL_ATTR
from services.telemetry.store import number_attribute


@dataclass(frozen=True)
class ScoreRow:
    id: int
    session: str
    trace_id: str
    name: str
    value: float
    source: str
    comment: str
    agent: str
    version: str
    endpoint: str
    tenant: str
    user: str
    create_time: datetime


def _score(r: asyncpg.Record) -> ScoreRow:
    return ScoreRow(r["id"], r["session"], r["trace_id"], r["name"], r["value"], r["source"], r["comment"],
                    r["agent"], r["version"], r["endpoint"], r["tenant"], r["user_id"], r["create_time"])


class EvaluationStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def session_pin(self, tenant: str, session: str) -> tuple[str, str, str] | None:
        """(agent, version, endpoint) of a session of `tenant`, from its invocation spans."""
        row = await self.pool.fetchrow(
            """SELECT agent, version, endpoint FROM telemetry.spans
               WHERE tenant = $1 AND session = $2 AND is_invocation ORDER BY start_time DESC LIMIT 1""",
            tenant, session,
        )
        return (row["agent"], row["version"], row["endpoint"]) if row else None

    async def trace_in_session(self, tenant: str, session: str, trace_id: str) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT true FROM telemetry.spans WHERE tenant = $1 AND session = $2 AND trace_id = $3 LIMIT 1",
            tenant, session, trace_id,
        ))

    async def insert_score(self, **values: Any) -> ScoreRow:
        row = await self.pool.fetchrow(
            """INSERT INTO telemetry.scores
                   (session, trace_id, name, value, source, comment, agent, version, endpoint, tenant, user_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING *""",
            values["session"], values["trace_id"], values["name"], values["value"], values["source"],
            values["comment"], values["agent"], values["version"], values["endpoint"], values["tenant"],
            values["user"],
        )
        return _score(row)

    async def list_scores(
        self, tenant: str, session: str, version: str, name: str, offset: int, limit: int
    ) -> list[ScoreRow]:
        rows = await self.pool.fetch(
            """SELECT * FROM telemetry.scores WHERE tenant = $1 AND ($2 = '' OR session = $2)
                   AND ($3 = '' OR version = $3) AND ($4 = '' OR name = $4)
               ORDER BY create_time DESC, id DESC OFFSET $5 LIMIT $6""",
            tenant, session, version, name, offset, limit,
        )
        return [_score(r) for r in rows]

    async def observations(
        self, version: str, start: datetime, end: datetime, endpoint: str, score_names: list[str]
    ) -> list[SessionObservation]:
        """One observation per session of `version` with an invocation in the window, in the
        order the sessions started. Across tenants: the comparison returns aggregates only."""
        rows = await self.pool.fetch(
            f"""WITH inv AS (
                    SELECT session, min(start_time) AS first_time, count(*) AS invocations,
                           count(*) FILTER (WHERE status = 'ERROR') AS failed,
                           array_agg(duration_ms ORDER BY start_time) AS latencies
                    FROM telemetry.spans
                    WHERE version = $1 AND is_invocation AND start_time >= $2 AND start_time < $3
                      AND ($4 = '' OR endpoint = $4) AND session <> ''
                    GROUP BY session),
                other AS (
                    SELECT session,
                           count(*) FILTER (WHERE attributes ? '{TOOL_ATTR}') AS tool_calls,
                           count(*) FILTER (WHERE attributes ? '{TOOL_ATTR}' AND status = 'ERROR') AS tool_failures,
                           coalesce(sum(coalesce({number_attribute('gen_ai.usage.input_tokens')}, 0)
                                        + coalesce({number_attribute('gen_ai.usage.output_tokens')}, 0)), 0)
                               AS tokens
                    FROM telemetry.spans
                    WHERE version = $1 AND NOT is_invocation AND start_time >= $2 AND start_time < $3
                      AND session IN (SELECT session FROM inv)
                    GROUP BY session),
                sc AS (
                    SELECT session, jsonb_object_agg(name, mean) AS scores FROM (
                        SELECT session, name, avg(value) AS mean FROM telemetry.scores
                        WHERE version = $1 AND name = ANY($5::text[]) AND session IN (SELECT session FROM inv)
                        GROUP BY session, name) s
                    GROUP BY session)
                SELECT inv.*, coalesce(other.tool_calls, 0) AS tool_calls,
                       coalesce(other.tool_failures, 0) AS tool_failures, coalesce(other.tokens, 0) AS tokens,
                       sc.scores
                FROM inv LEFT JOIN other USING (session) LEFT JOIN sc USING (session)
                ORDER BY inv.first_time""",
            version, start, end, endpoint, score_names,
        )
        import json

        out = []
        for r in rows:
            scores = json.loads(r["scores"]) if r["scores"] else {}
            out.append(SessionObservation(
                invocations=r["invocations"], failed_invocations=r["failed"],
                latencies_ms=tuple(float(x) for x in r["latencies"]),
                tool_calls=r["tool_calls"], tool_failures=r["tool_failures"], tokens=int(r["tokens"]),
                scores={k: min(1.0, max(0.0, float(v))) for k, v in scores.items()},
            ))
        return out
