"""Telemetry's log domain: stores what agents printed and logged (OTLP log records), each
invocation's within its bound, and lists a tenant's by agent, version, session and invocation."""

from __future__ import annotations

import logging

from services.common.paging import PageQuery
from services.telemetry import rules
from services.telemetry.log_model import LogBatch, LogFilter, LogPage, LogStore
from services.telemetry.model import ExportResult, TenantScope

log = logging.getLogger(__name__)


class AgentLogs:
    def __init__(self, store: LogStore) -> None:
        self._store = store

    async def export(self, batch: LogBatch) -> ExportResult:
        """Stores the batch's records, at most MAX_INVOCATION_LOG_BYTES per invocation."""
        stored = (
            await self._store.insert_logs(batch.rows, rules.MAX_INVOCATION_LOG_BYTES)
            if batch.rows
            else 0
        )
        if batch.rejected:
            log.warning("logs export: %s", batch.reason)
        return ExportResult(len(batch.rows), stored, batch.rejected, batch.reason)

    async def list_logs(
        self, tenant: TenantScope, where: LogFilter, page_size: int, page_token: str
    ) -> LogPage:
        where = rules.checked_log_filter(where)
        query = PageQuery.start(
            "ListLogs", owner=tenant or "", where=where, page_size=page_size, token=page_token,
            key_shape=(int,), default_size=rules.LOG_PAGE_SIZE,
        )
        rows = await self._store.list_logs(tenant, where, query.after, query.fetch_limit)
        page = query.page(rows, key=lambda r: (r.id,))
        follow = (
            query.token_after((page.items[-1].id,)) if page.items else page_token
        )
        return LogPage(page.items, page.next_page_token, follow)
