"""Spans in PostgreSQL (schema `telemetry`): batch inserts and the tenant-scoped queries."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from services.telemetry.spans import (
    TOOL_ATTR,
    Cursor,
    SpanFilter,
    SpanRow,
    TraceSummary,
    VersionMetrics,
)

log = logging.getLogger(__name__)


def number_attribute(key: str) -> str:
    """SQL for a numeric span attribute, NULL when the span carries anything else there (spans
    come from outside: a string must not break the query)."""
    return f"(CASE WHEN jsonb_typeof(attributes->'{key}') = 'number' THEN (attributes->>'{key}')::numeric END)"

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
    ("attributes", "text"),
    ("resource", "text"),
)
_NAMES = ", ".join(name for name, _ in _COLUMNS)
_SELECTS = ", ".join(
    f"u.{name}::jsonb" if name in ("attributes", "resource") else f"u.{name}"
    for name, _ in _COLUMNS
)
_UNNEST = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(_COLUMNS, start=1))
# One statement per export whatever its size: every column travels as one array parameter.
_INSERT = (
    f"INSERT INTO telemetry.spans ({_NAMES}) "
    f"SELECT {_SELECTS} FROM unnest({_UNNEST}) AS u({_NAMES}) "
    "ON CONFLICT (trace_id, span_id) DO NOTHING"
)


class _Where:
    """Accumulates conditions with numbered parameters."""

    def __init__(self, tenant: str) -> None:
        self.args: list[Any] = [tenant]
        self.conditions = ["tenant = $1"]

    def add(self, template: str, *values: Any) -> None:
        params = []
        for value in values:
            self.args.append(value)
            params.append(f"${len(self.args)}")
        self.conditions.append(template.format(*params))

    def filter(self, f: SpanFilter) -> None:
        for column in ("agent", "version", "endpoint", "session", "trace_id"):
            value = getattr(f, column)
            if value:
                self.add(f"{column} = {{}}", value)
        if f.start_time is not None:
            self.add("start_time >= {}", f.start_time)
        if f.end_time is not None:
            self.add("start_time < {}", f.end_time)
        if f.errors_only:
            self.conditions.append("status = 'ERROR'")

    @property
    def sql(self) -> str:
        return " AND ".join(self.conditions)


def _row(record: asyncpg.Record) -> SpanRow:
    values = dict(record)
    values["attributes"] = json.loads(values["attributes"])
    values["resource"] = json.loads(values["resource"])
    return SpanRow(**values)


class PgSpanStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def insert_spans(self, rows: Sequence[SpanRow]) -> int:
        columns: list[list[Any]] = [[] for _ in _COLUMNS]
        for row in rows:
            for values, (name, _) in zip(columns, _COLUMNS):
                value = getattr(row, name)
                values.append(json.dumps(value) if name in ("attributes", "resource") else value)
        status = await self._pool.execute(_INSERT, *columns)
        # "INSERT 0 <n>": n counts rows written, so spans already stored are not counted.
        return int(status.rsplit(" ", 1)[-1])

    async def list_spans(
        self, tenant: str, span_filter: SpanFilter, after: Cursor | None, limit: int
    ) -> list[SpanRow]:
        where = _Where(tenant)
        where.filter(span_filter)
        if after is not None:
            where.add(
                "(start_time, trace_id, span_id) < ({}, {}, {})",
                after.start_time,
                after.trace_id,
                after.span_id,
            )
        where.args.append(limit)
        sql = (
            f"SELECT {_NAMES} FROM telemetry.spans WHERE {where.sql} "
            f"ORDER BY start_time DESC, trace_id DESC, span_id DESC LIMIT ${len(where.args)}"
        )
        return [_row(r) for r in await self._pool.fetch(sql, *where.args)]

    async def list_traces(
        self, tenant: str, span_filter: SpanFilter, after: Cursor | None, limit: int
    ) -> list[TraceSummary]:
        where = _Where(tenant)
        where.conditions.append("is_invocation")
        where.filter(span_filter)
        page = ""
        if after is not None:
            where.args += [after.start_time, after.trace_id]
            n = len(where.args)
            page = f"WHERE (start_time, trace_id) < (${n - 1}, ${n})"
        where.args.append(limit)
        # A trace with several matching invocation spans (an agent calling an agent) is
        # summarised by the first one; paging applies to the summaries, not to the spans.
        sql = f"""
            WITH invocations AS (
                SELECT DISTINCT ON (trace_id)
                       trace_id, name, start_time, duration_ms, status, agent, version, endpoint, session
                  FROM telemetry.spans
                 WHERE {where.sql}
                 ORDER BY trace_id, start_time, span_id)
            SELECT i.*,
                   (SELECT count(*) FROM telemetry.spans s
                     WHERE s.trace_id = i.trace_id AND s.tenant = $1) AS span_count
              FROM invocations i
              {page}
             ORDER BY start_time DESC, trace_id DESC
             LIMIT ${len(where.args)}"""
        records = await self._pool.fetch(sql, *where.args)
        return [
            TraceSummary(
                trace_id=r["trace_id"],
                root_span_name=r["name"],
                start_time=r["start_time"],
                duration_ms=r["duration_ms"],
                status=r["status"],
                agent=r["agent"],
                version=r["version"],
                endpoint=r["endpoint"],
                session=r["session"],
                span_count=r["span_count"],
            )
            for r in records
        ]

    async def version_metrics(
        self, tenant: str, agent: str, start: datetime | None, end: datetime | None
    ) -> list[VersionMetrics]:
        where = _Where(tenant)
        where.conditions += ["version <> ''"]
        where.add("agent = {}", agent)
        if start is not None:
            where.add("start_time >= {}", start)
        if end is not None:
            where.add("start_time < {}", end)
        sql = f"""
            SELECT version,
                   count(*) FILTER (WHERE is_invocation) AS invocations,
                   count(*) FILTER (WHERE is_invocation AND status = 'ERROR') AS errors,
                   count(DISTINCT session) FILTER (WHERE is_invocation AND session <> '') AS sessions,
                   percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY duration_ms)
                       FILTER (WHERE is_invocation) AS latency,
                   count(*) FILTER (WHERE attributes ? '{TOOL_ATTR}') AS tool_calls,
                   count(*) FILTER (WHERE attributes ? '{TOOL_ATTR}' AND status = 'ERROR')
                       AS tool_failures,
                   coalesce(sum({number_attribute('gen_ai.usage.input_tokens')}), 0) AS input_tokens,
                   coalesce(sum({number_attribute('gen_ai.usage.output_tokens')}), 0) AS output_tokens
              FROM telemetry.spans
             WHERE {where.sql}
             GROUP BY version"""
        records = await self._pool.fetch(sql, *where.args)
        by_model: dict[str, dict[str, tuple[int, int]]] = {}
        for r in await self._pool.fetch(
            f"""SELECT version, attributes->>'gen_ai.request.model' AS model,
                       coalesce(sum({number_attribute('gen_ai.usage.input_tokens')}), 0) AS input_tokens,
                       coalesce(sum({number_attribute('gen_ai.usage.output_tokens')}), 0) AS output_tokens
                  FROM telemetry.spans
                 WHERE {where.sql} AND attributes ? 'gen_ai.request.model'
                 GROUP BY version, model""",
            *where.args,
        ):
            by_model.setdefault(r["version"], {})[r["model"]] = (
                int(r["input_tokens"]), int(r["output_tokens"]))
        return [
            VersionMetrics(
                version=r["version"],
                invocations=r["invocations"],
                errors=r["errors"],
                sessions=r["sessions"],
                # No invocation span in the window (only tool or agent spans): no latency.
                latency_p50_ms=(r["latency"] or (0.0,))[0],
                latency_p95_ms=(r["latency"] or (0.0, 0.0))[1],
                latency_p99_ms=(r["latency"] or (0.0, 0.0, 0.0))[2],
                tool_calls=r["tool_calls"],
                tool_failures=r["tool_failures"],
                input_tokens=int(r["input_tokens"]),
                output_tokens=int(r["output_tokens"]),
                tokens_by_model=by_model.get(r["version"], {}),
            )
            for r in records
        ]
