"""Every agent version across tenants, for the Prometheus exposition: usage over all time and
invocation latency over a recent window."""

from __future__ import annotations

import asyncpg

from services.telemetry.model import FleetVersion
from services.telemetry.store.sql import INVOCATION, LATENCY, USAGE, latency, usage_counts


class PgFleetMetrics:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def fleet_versions(self, latency_window_s: float) -> list[FleetVersion]:
        totals = await self._pool.fetch(
            f"SELECT tenant, agent, version, {USAGE} FROM telemetry.spans "
            "WHERE version <> '' AND platform GROUP BY tenant, agent, version"
        )
        recent = await self._pool.fetch(
            f"""SELECT tenant, agent, version, {LATENCY} FROM telemetry.spans
                 WHERE {INVOCATION} AND version <> ''
                   AND start_time > now() - make_interval(secs => $1)
                 GROUP BY tenant, agent, version""",
            latency_window_s,
        )
        latencies = {(r["tenant"], r["agent"], r["version"]): latency(r) for r in recent}
        return [
            FleetVersion(
                agent=r["agent"],
                version=r["version"],
                counts=usage_counts(r),
                latency=latencies.get((r["tenant"], r["agent"], r["version"])),
                tenant=r["tenant"],
            )
            for r in totals
        ]
