"""Agents' log records in PostgreSQL (schema `telemetry`): inserts within each invocation's
budget, and the tenant-scoped listing in arrival order."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import asyncpg

from services.common.db import from_row
from services.common.paging import Key
from services.telemetry import rules
from services.telemetry.log_model import LogFilter, LogRow
from services.telemetry.model import TenantScope
from services.telemetry.store.sql import Param, Where

# Column order shared by the insert's unnest() and by LogRow (its id is the table's).
_COLUMNS = (
    ("tenant", "text"),
    ("time", "timestamptz"),
    ("agent", "text"),
    ("version", "text"),
    ("session", "text"),
    ("invocation_id", "text"),
    ("trace_id", "text"),
    ("span_id", "text"),
    ("severity_number", "int4"),
    ("severity_text", "text"),
    ("source", "text"),
    ("body", "text"),
    ("platform", "bool"),
)
_NAMES = ", ".join(name for name, _ in _COLUMNS)
_UNNEST = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(_COLUMNS, start=1))
# Rows in the order given (WITH ORDINALITY): ids follow the order the records were written in.
_INSERT = (
    f"INSERT INTO telemetry.logs ({_NAMES}) "
    f"SELECT {_NAMES} FROM unnest({_UNNEST}) WITH ORDINALITY AS u({_NAMES}, n) ORDER BY n"
)
# Takes (and locks, until the transaction ends) one scope's budget.
_BUDGET = """
    INSERT INTO telemetry.log_budgets AS b (tenant, scope) VALUES ($1, $2)
    ON CONFLICT (tenant, scope) DO UPDATE SET used_bytes = b.used_bytes
    RETURNING used_bytes, truncated"""
_SPEND = """
    UPDATE telemetry.log_budgets SET used_bytes = $3, truncated = truncated OR $4
     WHERE tenant = $1 AND scope = $2"""


class PgLogStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def insert_logs(self, rows: Sequence[LogRow], budget_bytes: int) -> int:
        scopes: dict[tuple[str, str], list[LogRow]] = defaultdict(list)
        for row in rows:
            scopes[(row.tenant, rules.budget_scope(row))].append(row)
        kept: list[LogRow] = []
        stored = 0
        async with self._pool.acquire() as conn, conn.transaction():
            # Budgets in one order, so that concurrent exports never wait on each other in a cycle.
            for (tenant, scope), group in sorted(scopes.items(), key=lambda item: item[0]):
                if not scope:
                    kept += group
                    stored += len(group)
                    continue
                budget = await conn.fetchrow(_BUDGET, tenant, scope)
                assert budget is not None  # INSERT ... RETURNING returns the row
                fit, used, note = rules.within_budget(group, budget["used_bytes"], budget_bytes)
                await conn.execute(_SPEND, tenant, scope, used, note is not None)
                kept += fit
                stored += len(fit)
                if note is not None and not budget["truncated"]:
                    kept.append(note)
            if kept:
                columns: list[list[Param]] = [[] for _ in _COLUMNS]
                for row in kept:
                    for column, (name, _) in zip(columns, _COLUMNS, strict=True):
                        column.append(getattr(row, name))
                await conn.execute(_INSERT, *columns)
        return stored

    async def list_logs(
        self, tenant: TenantScope, where: LogFilter, after: Key | None, limit: int
    ) -> list[LogRow]:
        sql = Where.of_tenant(tenant)
        sql.add("agent = {}", where.agent.name)
        sql.equal("version", where.version.name if where.version else "")
        sql.equal("session", where.session.name if where.session else "")
        sql.equal("invocation_id", where.invocation_id)
        if where.start_time is not None:
            sql.add("time >= {}", where.start_time)
        if after is not None:
            sql.add("id > {}", after[0])
        records = await self._pool.fetch(
            f"SELECT id, {_NAMES} FROM telemetry.logs WHERE {sql.sql} "
            f"ORDER BY id LIMIT {sql.param(limit)}",
            *sql.args,
        )
        return [from_row(LogRow, r) for r in records]
