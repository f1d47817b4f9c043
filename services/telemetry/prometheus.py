"""Per-version RED metrics for Prometheus: invocations and errors (counters over all time),
sessions, and latency quantiles over the last five minutes, for every agent and version."""

from __future__ import annotations

import asyncpg

from services.common.prometheus import Family, Snapshot

WINDOW = "5 minutes"


def version_snapshot(pool: asyncpg.Pool):  # type: ignore[no-untyped-def]
    async def refresh() -> Snapshot:
        labels = ("agent", "version")
        invocations = Family("corral_version_invocations", "Invocations of the version", labels, "counter")
        errors = Family("corral_version_errors", "Failed invocations of the version", labels, "counter")
        sessions = Family("corral_version_sessions", "Distinct sessions that invoked the version", labels)
        latency = Family("corral_version_latency_ms", f"Invocation latency quantiles over the last {WINDOW}",
                         (*labels, "quantile"))
        totals = await pool.fetch(
            """SELECT agent, version, count(*) AS n, count(*) FILTER (WHERE status = 'ERROR') AS errors,
                      count(DISTINCT session) AS sessions
               FROM telemetry.spans WHERE is_invocation AND version <> '' GROUP BY agent, version""")
        for r in totals:
            key = (r["agent"], r["version"])
            invocations.samples.append((key, float(r["n"])))
            errors.samples.append((key, float(r["errors"])))
            sessions.samples.append((key, float(r["sessions"])))
        recent = await pool.fetch(
            f"""SELECT agent, version,
                       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY duration_ms) AS q
                FROM telemetry.spans
                WHERE is_invocation AND version <> '' AND start_time > now() - interval '{WINDOW}'
                GROUP BY agent, version""")
        for r in recent:
            for quantile, value in zip(("0.5", "0.95", "0.99"), r["q"]):
                latency.samples.append(((r["agent"], r["version"], quantile), float(value)))
        return [invocations, errors, sessions, latency]

    return refresh
