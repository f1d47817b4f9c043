"""SQL pieces the span, score and fleet queries share: conditions with numbered parameters, and
the per-version aggregates (usage counts, latency quantiles) over telemetry.spans."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from services.common.db import from_row
from services.common.paging import Key
from services.telemetry.model import (
    INPUT_TOKENS_ATTR,
    OUTPUT_TOKENS_ATTR,
    TOOL_ATTR,
    Latency,
    UsageCounts,
)

# Parameters asyncpg binds for these queries.
Param = str | int | float | bool | datetime | list[str] | None


def number_attribute(key: str) -> str:
    """SQL for a numeric span attribute, NULL when the span carries anything else there (spans
    come from outside: a string must not break the query)."""
    return (
        f"(CASE WHEN jsonb_typeof(attributes->'{key}') = 'number' "
        f"THEN (attributes->>'{key}')::numeric END)"
    )


def tokens(attribute: str) -> str:
    """The sum of a numeric attribute over the platform's spans selected, whole, 0 for none."""
    return f"trunc(coalesce(sum({attribute}) FILTER (WHERE platform), 0))::bigint"


INPUT_TOKENS = number_attribute(INPUT_TOKENS_ATTR)
OUTPUT_TOKENS = number_attribute(OUTPUT_TOKENS_ATTR)
# An invocation the platform ran: a tenant's own exported spans may say `invoke_agent`, and are
# listed as traces, but never count in metrics or rollout analysis.
INVOCATION = "(is_invocation AND platform)"
# A tool call the platform's broker made (a tenant's own exported spans never count).
IS_TOOL_CALL = f"(platform AND attributes ? '{TOOL_ATTR}')"

# A version's usage over the spans selected (one row per version); read with usage_counts().
USAGE = f"""
    count(*) FILTER (WHERE {INVOCATION}) AS invocations,
    count(*) FILTER (WHERE {INVOCATION} AND status = 'ERROR') AS errors,
    count(DISTINCT session) FILTER (WHERE {INVOCATION} AND session <> '') AS sessions,
    count(*) FILTER (WHERE {IS_TOOL_CALL}) AS tool_calls,
    count(*) FILTER (WHERE {IS_TOOL_CALL} AND status = 'ERROR') AS tool_failures,
    {tokens(INPUT_TOKENS)} AS input_tokens,
    {tokens(OUTPUT_TOKENS)} AS output_tokens"""

# Invocation latency quantiles; read with latency().
LATENCY = f"""
    percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY duration_ms)
        FILTER (WHERE {INVOCATION}) AS latency"""


def usage_counts(r: asyncpg.Record) -> UsageCounts:
    return from_row(UsageCounts, r)


def latency(r: asyncpg.Record) -> Latency:
    """No invocation among the spans selected (only tool or model spans): no latency."""
    quantiles = r["latency"]
    if not quantiles:
        return Latency()
    p50, p95, p99 = (float(q) for q in quantiles)
    return Latency(p50, p95, p99)


class Where:
    """Accumulates conditions with numbered parameters, in the order the SQL uses them."""

    def __init__(self, first: str, *values: Param) -> None:
        self.args: list[Param] = []
        self.conditions: list[str] = []
        self.add(first, *values)

    def param(self, value: Param) -> str:
        """The placeholder for one more parameter."""
        self.args.append(value)
        return f"${len(self.args)}"

    def add(self, template: str, *values: Param) -> None:
        """A condition; each {} in `template` becomes the placeholder of the next value."""
        self.conditions.append(template.format(*(self.param(v) for v in values)))

    def equal(self, column: str, value: str) -> None:
        """column = value, unless value is empty (matches anything)."""
        if value:
            self.add(f"{column} = {{}}", value)

    def window(self, start: datetime | None, end: datetime | None) -> None:
        """Spans that start in [start, end); either end may be open."""
        if start is not None:
            self.add("start_time >= {}", start)
        if end is not None:
            self.add("start_time < {}", end)

    def after(self, columns: str, key: Key | None) -> str:
        """The condition for rows past the keyset position `key` in the newest-first order of
        `columns` ("" for the first page), its parameters added, for where the SQL needs it."""
        if key is None:
            return ""
        return f"({columns}) < ({', '.join(self.param(part) for part in key)})"

    def page(self, columns: str, key: Key | None) -> None:
        """Only rows past `key` (see after())."""
        condition = self.after(columns, key)
        if condition:
            self.conditions.append(condition)

    @classmethod
    def of_tenant(cls, tenant: str | None) -> Where:
        """Rows of `tenant`, or of every tenant for None."""
        return cls("true") if tenant is None else cls("tenant = {}", tenant)

    @property
    def sql(self) -> str:
        return " AND ".join(self.conditions)
