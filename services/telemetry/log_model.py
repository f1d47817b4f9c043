"""Telemetry's values for what agents print and log (OTLP log records), and the store seam."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from corral.names import AgentRef, SessionRef, VersionRef
from services.common.paging import Key
from services.telemetry.model import TenantScope


@dataclass(frozen=True)
class LogRow:
    """One log record as stored: the Corral names it is filed under (trusted from the platform,
    normalised and in the exporter's tenant otherwise, as spans) and what it says. `id` is the
    store's, in arrival order (0 before it is stored)."""

    tenant: str
    time: datetime
    agent: str
    version: str
    session: str
    invocation_id: str
    trace_id: str
    span_id: str
    severity_number: int
    severity_text: str
    source: str
    body: str
    platform: bool
    id: int = 0

    @property
    def size(self) -> int:
        """What the record counts against its invocation's bound: its body's UTF-8 bytes and a
        newline (so that empty records are bounded in number too)."""
        return len(self.body.encode(errors="replace")) + 1


@dataclass(frozen=True)
class LogFilter:
    """Whose records: an agent's, optionally one version, session or invocation, since a time."""

    agent: AgentRef
    version: VersionRef | None = None
    session: SessionRef | None = None
    invocation_id: str = ""
    start_time: datetime | None = None


@dataclass(frozen=True)
class LogBatch:
    """An OTLP logs export as the domain stores it, and how many records were rejected (why)."""

    rows: Sequence[LogRow]
    rejected: int = 0
    reason: str = ""


@dataclass(frozen=True)
class LogPage:
    items: list[LogRow]
    next_page_token: str
    # Continues after the last record returned (or where the request's token did), for polling.
    follow_token: str


class LogStore(Protocol):
    async def insert_logs(self, rows: Sequence[LogRow], budget_bytes: int) -> int:
        """Stores the rows, at most `budget_bytes` of bodies per (tenant, invocation) over all
        exports; when an invocation first goes over, one note row says so. Returns how many of
        `rows` were stored."""
        ...

    async def list_logs(
        self, tenant: TenantScope, where: LogFilter, after: Key | None, limit: int
    ) -> list[LogRow]:
        """Oldest first (arrival order); `after` is the previous page's last (id,)."""
        ...
