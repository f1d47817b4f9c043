"""Per-version RED metrics for Prometheus: invocations and errors (counters over all time),
sessions, tool calls and failures, model tokens, and latency quantiles over the last five
minutes, for every agent and version."""

from __future__ import annotations

import asyncpg

from services.common.prometheus import Family, Snapshot
from services.telemetry.spans import TOOL_ATTR
from services.telemetry.store import number_attribute

WINDOW = "5 minutes"


def version_snapshot(pool: asyncpg.Pool):  # type: ignore[no-untyped-def]
    async def refresh() -> Snapshot:
        labels = ("agent", "version")
        invocations = Family("corral_version_invocations", "Invocations of the version", labels, "counter")
        errors = Family("corral_version_errors", "Failed invocations of the version", labels, "counter")
        sessions = Family("corral_version_sessions", "Distinct sessions that invoked the version", labels)
        latency = Family("corral_version_latency_ms", f"Invocation latency quantiles over the last {WINDOW}",
                         (*labels, "quantile"))
        tool_calls = Family("corral_version_tool_calls", "Tool calls through the broker", labels, "counter")
        tool_failures = Family("corral_version_tool_failures", "Tool calls that failed", labels, "counter")
        tokens = Family("corral_version_tokens", "Model tokens", (*labels, "direction"), "counter")
        totals = await pool.fetch(
            f"""SELECT agent, version, count(*) FILTER (WHERE is_invocation) AS n,
                      count(*) FILTER (WHERE is_invocation AND status = 'ERROR') AS errors,
                      count(DISTINCT session) FILTER (WHERE is_invocation) AS sessions,
                      count(*) FILTER (WHERE attributes ? '{TOOL_ATTR}') AS tool_calls,
                      count(*) FILTER (WHERE attributes ? '{TOOL_ATTR}' AND status = 'ERROR') AS tool_failures,
                      coalesce(sum({number_attribute('gen_ai.usage.input_tokens')}), 0) AS tokens_in,
                      coalesce(sum({number_attribute('gen_ai.usage.output_tokens')}), 0) AS tokens_out
               FROM telemetry.spans WHERE version <> '' GROUP BY agent, version""")
        for r in totals:
            key = (r["agent"], r["version"])
            invocations.samples.append((key, float(r["n"])))
            errors.samples.append((key, float(r["errors"])))
            sessions.samples.append((key, float(r["sessions"])))
            tool_calls.samples.append((key, float(r["tool_calls"])))
            tool_failures.samples.append((key, float(r["tool_failures"])))
            tokens.samples.append(((*key, "input"), float(r["tokens_in"])))
            tokens.samples.append(((*key, "output"), float(r["tokens_out"])))
        recent = await pool.fetch(
            f"""SELECT agent, version,
                       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY duration_ms) AS q
                FROM telemetry.spans
                WHERE is_invocation AND version <> '' AND start_time > now() - interval '{WINDOW}'
                GROUP BY agent, version""")
        for r in recent:
            for quantile, value in zip(("0.5", "0.95", "0.99"), r["q"]):
                latency.samples.append(((r["agent"], r["version"], quantile), float(value)))
        return [invocations, errors, sessions, latency, tool_calls, tool_failures, tokens]

    return refresh
