"""Spans in PostgreSQL (schema `telemetry`): batch inserts and the tenant-scoped queries."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from corral.names import AgentRef, SessionRef
from services.common.db import from_row
from services.common.paging import Key
from services.telemetry.model import (
    MODEL_ATTR,
    SpanEvent,
    SpanFilter,
    SpanRow,
    SpanStatus,
    TenantScope,
    TraceSummary,
    VersionMetrics,
)
from services.telemetry.store.sql import (
    INPUT_TOKENS,
    INVOCATION,
    LATENCY,
    OUTPUT_TOKENS,
    USAGE,
    Param,
    Where,
    latency,
    tokens,
    usage_counts,
)

# Column order shared by the insert's unnest() and by SpanRow.
_COLUMNS = (
    ("trace_id", "text"),
    ("span_id", "text"),
    ("parent_span_id", "text"),
    ("name", "text"),
    ("service", "text"),
    ("kind", "text"),
    ("start_time", "timestamptz"),
    ("end_time", "timestamptz"),
    ("duration_ms", "float8"),
    ("status", "text"),
    ("status_message", "text"),
    ("agent", "text"),
    ("version", "text"),
    ("endpoint", "text"),
    ("session", "text"),
    ("tenant", "text"),
    ("invocation_id", "text"),
    ("is_invocation", "bool"),
    ("platform", "bool"),
    ("attributes", "text"),
    ("resource", "text"),
    ("events", "text"),
)
_JSON = ("attributes", "resource", "events")
_NAMES = ", ".join(name for name, _ in _COLUMNS)
_SELECTS = ", ".join(f"u.{name}::jsonb" if name in _JSON else f"u.{name}" for name, _ in _COLUMNS)
_UNNEST = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(_COLUMNS, start=1))
# One statement per export whatever its size: every column travels as one array parameter.
_INSERT = (
    f"INSERT INTO telemetry.spans ({_NAMES}) "
    f"SELECT {_SELECTS} FROM unnest({_UNNEST}) AS u({_NAMES}) "
    "ON CONFLICT (tenant, trace_id, span_id) DO NOTHING"
)


def _values(row: SpanRow) -> tuple[Param, ...]:
    """A row's values in _COLUMNS order."""
    return (
        row.trace_id,
        row.span_id,
        row.parent_span_id,
        row.name,
        row.service,
        row.kind,
        row.start_time,
        row.end_time,
        row.duration_ms,
        row.status.value,
        row.status_message,
        row.agent,
        row.version,
        row.endpoint,
        row.session,
        row.tenant,
        row.invocation_id,
        row.is_invocation,
        row.platform,
        json.dumps(row.attributes),
        json.dumps(row.resource),
        json.dumps([
            {"name": e.name, "time": e.time.isoformat(), "attributes": e.attributes}
            for e in row.events
        ]),
    )


def _row(r: asyncpg.Record) -> SpanRow:
    return from_row(
        SpanRow,
        r,
        status=SpanStatus(r["status"]),
        attributes=json.loads(r["attributes"]),
        resource=json.loads(r["resource"]),
        events=tuple(
            SpanEvent(e["name"], datetime.fromisoformat(e["time"]), e["attributes"])
            for e in json.loads(r["events"])
        ),
    )


def _filtered(tenant: TenantScope, where: SpanFilter) -> Where:
    sql = Where.of_tenant(tenant)
    for column, ref in (
        ("agent", where.agent),
        ("version", where.version),
        ("endpoint", where.endpoint),
        ("session", where.session),
    ):
        sql.equal(column, "" if ref is None else ref.name)
    sql.equal("trace_id", where.trace_id)
    sql.window(where.start_time, where.end_time)
    if where.errors_only:
        sql.conditions.append("status = 'ERROR'")
    return sql


class PgSpanStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def insert_spans(self, rows: Sequence[SpanRow]) -> int:
        columns: list[list[Param]] = [[] for _ in _COLUMNS]
        for row in rows:
            for column, value in zip(columns, _values(row), strict=True):
                column.append(value)
        status = await self._pool.execute(_INSERT, *columns)
        # "INSERT 0 <n>": n counts rows written, so spans already stored are not counted.
        return int(status.rsplit(" ", 1)[-1])

    async def list_spans(
        self, tenant: TenantScope, where: SpanFilter, after: Key | None, limit: int
    ) -> list[SpanRow]:
        sql = _filtered(tenant, where)
        sql.page("start_time, trace_id, span_id", after)
        records = await self._pool.fetch(
            f"SELECT {_NAMES} FROM telemetry.spans WHERE {sql.sql} "
            "ORDER BY start_time DESC, trace_id DESC, span_id DESC "
            f"LIMIT {sql.param(limit)}",
            *sql.args,
        )
        return [_row(r) for r in records]

    async def newest_invocation(self, tenant: str, session: SessionRef) -> SpanRow | None:
        record = await self._pool.fetchrow(
            f"""SELECT {_NAMES} FROM telemetry.spans
                 WHERE tenant = $1 AND session = $2 AND {INVOCATION}
                 ORDER BY start_time DESC LIMIT 1""",
            tenant,
            session.name,
        )
        return None if record is None else _row(record)

    async def has_trace(self, tenant: str, session: SessionRef, trace_id: str) -> bool:
        found = await self._pool.fetchval(
            """SELECT true FROM telemetry.spans
                WHERE tenant = $1 AND session = $2 AND trace_id = $3 LIMIT 1""",
            tenant,
            session.name,
            trace_id,
        )
        return bool(found)

    async def list_traces(
        self, tenant: TenantScope, where: SpanFilter, after: Key | None, limit: int
    ) -> list[TraceSummary]:
        sql = _filtered(tenant, where)
        sql.conditions.append("is_invocation")
        page = sql.after("start_time, trace_id", after)
        # A trace with several matching invocation spans (an agent calling an agent) is
        # summarised by the first one; paging applies to the summaries, not to the spans.
        records = await self._pool.fetch(
            f"""
            WITH invocations AS (
                SELECT DISTINCT ON (tenant, trace_id)
                       tenant, trace_id, name, start_time, duration_ms, status, agent, version, endpoint,
                       session
                  FROM telemetry.spans
                 WHERE {sql.sql}
                 ORDER BY tenant, trace_id, start_time, span_id)
            SELECT i.*,
                   (SELECT count(*) FROM telemetry.spans s
                     WHERE s.trace_id = i.trace_id AND s.tenant = i.tenant) AS span_count
              FROM invocations i
              {f"WHERE {page}" if page else ""}
             ORDER BY start_time DESC, trace_id DESC
             LIMIT {sql.param(limit)}""",
            *sql.args,
        )
        return [
            from_row(TraceSummary, r, root_span_name=r["name"], status=SpanStatus(r["status"]))
            for r in records
        ]

    async def version_metrics(
        self, tenant: TenantScope, agent: AgentRef, start: datetime | None, end: datetime | None
    ) -> list[VersionMetrics]:
        sql = Where.of_tenant(tenant)
        sql.conditions.append("version <> '' AND platform")
        sql.add("agent = {}", agent.name)
        sql.window(start, end)
        records = await self._pool.fetch(
            f"SELECT version, {USAGE}, {LATENCY} FROM telemetry.spans WHERE {sql.sql} "
            "GROUP BY version",
            *sql.args,
        )
        by_model: dict[str, dict[str, tuple[int, int]]] = {}
        for r in await self._pool.fetch(
            f"""SELECT version, attributes->>'{MODEL_ATTR}' AS model,
                       {tokens(INPUT_TOKENS)} AS input_tokens,
                       {tokens(OUTPUT_TOKENS)} AS output_tokens
                  FROM telemetry.spans
                 WHERE {sql.sql} AND attributes ? '{MODEL_ATTR}'
                 GROUP BY version, model""",
            *sql.args,
        ):
            by_model.setdefault(r["version"], {})[r["model"]] = (
                r["input_tokens"],
                r["output_tokens"],
            )
        return [
            VersionMetrics(
                version=r["version"],
                counts=usage_counts(r),
                latency=latency(r),
                tokens_by_model=by_model.get(r["version"], {}),
            )
            for r in records
        ]
