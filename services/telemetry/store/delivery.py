"""Exporters' delivery reports in PostgreSQL: each one's backlog (latest report) and the spans
each dropped."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from services.telemetry.gaps import Backlog, DeliveryReport, DroppedSpans


class PgDeliveryStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record_delivery(self, report: DeliveryReport) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO telemetry.exporter_delivery (exporter, undelivered_since, report_time)
                   VALUES ($1, $2, now())
                   ON CONFLICT (exporter) DO UPDATE
                   SET undelivered_since = EXCLUDED.undelivered_since, report_time = now()""",
                report.exporter, report.undelivered_since,
            )
            if report.drops:
                await conn.executemany(
                    """INSERT INTO telemetry.dropped_spans
                       (exporter, start_time, end_time, count, report_time)
                       VALUES ($1, $2, $3, $4, now())""",
                    [(report.exporter, d.start, d.end, d.count) for d in report.drops],
                )

    async def backlogs_before(self, end: datetime) -> list[Backlog]:
        rows = await self._pool.fetch(
            """SELECT exporter, undelivered_since, report_time FROM telemetry.exporter_delivery
               WHERE undelivered_since < $1 ORDER BY undelivered_since""",
            end,
        )
        return [Backlog(r["exporter"], r["undelivered_since"], r["report_time"]) for r in rows]

    async def drops_meeting(self, start: datetime, end: datetime) -> list[DroppedSpans]:
        rows = await self._pool.fetch(
            """SELECT exporter, start_time, end_time, count FROM telemetry.dropped_spans
               WHERE start_time < $2 AND end_time >= $1 ORDER BY start_time""",
            start, end,
        )
        return [DroppedSpans(r["exporter"], r["start_time"], r["end_time"], r["count"])
                for r in rows]
