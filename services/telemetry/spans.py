"""Telemetry's span domain: stores exported spans (and the scores they carry) and answers the
tenant-scoped queries over them — spans, traces and per-version metrics with their cost. A tenant
of None reads every tenant's (a service acting for all)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime

from corral.names import AgentRef
from services.common.paging import KeyPart, Page, PageQuery
from services.telemetry import rules
from services.telemetry.model import (
    ExportBatch,
    ExportResult,
    ScoreStore,
    SpanFilter,
    SpanRow,
    SpanStore,
    TenantScope,
    TraceSummary,
    VersionMetrics,
)

log = logging.getLogger(__name__)

# model id -> US dollars per million (input, output) tokens.
Prices = Mapping[str, tuple[float, float]]


def priced(m: VersionMetrics, prices: Prices) -> VersionMetrics:
    """`m` with the cost of its tokens, naming the models that have no price."""
    cost, unpriced = 0.0, []
    for model, (tokens_in, tokens_out) in sorted(m.tokens_by_model.items()):
        price = prices.get(model)
        if price is None:
            unpriced.append(model)
            continue
        cost += (tokens_in * price[0] + tokens_out * price[1]) / 1_000_000
    return replace(m, cost_usd=round(cost, 6), unpriced_models=tuple(unpriced))


def _page(
    method: str,
    tenant: TenantScope,
    where: SpanFilter,
    size: int,
    token: str,
    key_shape: tuple[type[KeyPart], ...],
) -> PageQuery:
    return PageQuery.start(
        method,
        owner=tenant or "",
        where=where,
        page_size=size,
        token=token,
        key_shape=key_shape,
        default_size=rules.SPAN_PAGE_SIZE,
    )


class Telemetry:
    """Stores exported spans and answers the tenant-scoped queries over them."""

    def __init__(self, spans: SpanStore, scores: ScoreStore, prices: Prices | None = None) -> None:
        self._spans = spans
        self._scores = scores
        self._prices = dict(prices or {})

    async def export(self, batch: ExportBatch) -> ExportResult:
        """Stores the batch's spans (an exporter's retry stores nothing twice), then the scores
        its spans carried as evaluation events."""
        stored = await self._spans.insert_spans(batch.rows) if batch.rows else 0
        if batch.rejected:
            log.warning("export: %s", batch.reason)
        for score in batch.scores:
            await self._scores.insert_score(score)
        return ExportResult(len(batch.rows), stored, batch.rejected, batch.reason)

    async def list_spans(
        self, tenant: TenantScope, where: SpanFilter, page_size: int, page_token: str
    ) -> Page[SpanRow]:
        where = rules.checked_filter(where)
        query = _page("ListSpans", tenant, where, page_size, page_token, (datetime, str, str))
        rows = await self._spans.list_spans(tenant, where, query.after, query.fetch_limit)
        return query.page(rows, key=lambda r: (r.start_time, r.trace_id, r.span_id))

    async def list_traces(
        self, tenant: TenantScope, where: SpanFilter, page_size: int, page_token: str
    ) -> Page[TraceSummary]:
        where = rules.checked_filter(where)
        query = _page("ListTraces", tenant, where, page_size, page_token, (datetime, str))
        traces = await self._spans.list_traces(tenant, where, query.after, query.fetch_limit)
        return query.page(traces, key=lambda t: (t.start_time, t.trace_id))

    async def version_metrics(
        self, tenant: TenantScope, agent: AgentRef, start: datetime | None, end: datetime | None
    ) -> list[VersionMetrics]:
        rules.check_window(start, end)
        metrics = await self._spans.version_metrics(tenant, agent, start, end)
        ordered = sorted(metrics, key=lambda m: rules.version_order(m.version))
        return [priced(m, self._prices) for m in ordered]
