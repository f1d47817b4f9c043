"""Domain: what exporters report of the spans telemetry does not have (ReportDelivery), and the
missing data an analysed window has because of it (services/telemetry/gaps.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from services.common.clock import Clock
from services.common.errors import InvalidArgument
from services.telemetry.gaps import Backlog, DeliveryReport, DroppedSpans, missing_data


class DeliveryStore(Protocol):
    async def record_delivery(self, report: DeliveryReport) -> None:
        """Replaces the exporter's backlog and adds its drops."""
        ...

    async def backlogs_before(self, end: datetime) -> list[Backlog]:
        """Exporters whose latest report holds spans from before `end`."""
        ...

    async def drops_meeting(self, start: datetime, end: datetime) -> list[DroppedSpans]: ...


class Deliveries:
    def __init__(self, store: DeliveryStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    async def report(self, report: DeliveryReport) -> None:
        check_report(report)
        await self._store.record_delivery(report)

    async def missing(self, start: datetime, end: datetime) -> str:
        """Why spans of [start, end) may be missing; "" when no exporter says so."""
        backlogs = await self._store.backlogs_before(end)
        drops = await self._store.drops_meeting(start, end)
        return missing_data(start, end, backlogs, drops, self._clock.now())


def check_report(report: DeliveryReport) -> None:
    if not report.exporter:
        raise InvalidArgument.field("exporter", "name the exporter (e.g. the executor's name)")
    _check_drops(report.drops)


def _check_drops(drops: Sequence[DroppedSpans]) -> None:
    for i, d in enumerate(drops):
        if d.end < d.start:
            raise InvalidArgument.field(f"drops[{i}].end_time", "end_time is before start_time")
        if d.count <= 0:
            raise InvalidArgument.field(f"drops[{i}].count", f"{d.count} must be positive")
