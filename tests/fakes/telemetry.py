"""Telemetry's seams in memory: its span, score and log stores, with the filters, order and
keyset paging of the SQL, and the fleet the executor reports."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

from corral.names import AgentRef, SessionRef
from services.common.paging import Key
from services.telemetry import rules
from services.telemetry.analysis import SessionObservation
from services.telemetry.gaps import Backlog, DeliveryReport, DroppedSpans
from services.telemetry.log_model import LogFilter, LogRow
from services.telemetry.model import (
    INPUT_TOKENS_ATTR,
    MODEL_ATTR,
    OUTPUT_TOKENS_ATTR,
    TOOL_ATTR,
    Latency,
    NewScore,
    ObservationQuery,
    RecordedSession,
    Score,
    ScoreFilter,
    SpanFilter,
    SpanRow,
    SpanStatus,
    TenantScope,
    TraceSummary,
    UsageCounts,
    VersionMetrics,
)
from tests.fakes.common import keyset_page


class FakeSpanStore:
    """telemetry's SpanStore in memory, with the filters, order and keyset paging of the SQL."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], SpanRow] = {}

    def put(self, row: SpanRow) -> None:
        self.rows[row.tenant, row.trace_id, row.span_id] = row

    async def insert_spans(self, rows: Sequence[SpanRow]) -> int:
        new = [r for r in rows if (r.tenant, r.trace_id, r.span_id) not in self.rows]
        for row in new:
            self.put(row)
        return len(new)

    def _matching(self, tenant: TenantScope, where: SpanFilter) -> list[SpanRow]:
        def matches(r: SpanRow) -> bool:
            names = (
                (r.agent, where.agent),
                (r.version, where.version),
                (r.endpoint, where.endpoint),
                (r.session, where.session),
            )
            return (
                tenant in (None, r.tenant)
                and all(ref is None or value == ref.name for value, ref in names)
                and (not where.trace_id or r.trace_id == where.trace_id)
                and (where.start_time is None or r.start_time >= where.start_time)
                and (where.end_time is None or r.start_time < where.end_time)
                and (not where.errors_only or r.status is SpanStatus.ERROR)
            )

        return [r for r in self.rows.values() if matches(r)]

    async def list_spans(
        self, tenant: TenantScope, where: SpanFilter, after: Key | None, limit: int
    ) -> list[SpanRow]:
        return keyset_page(
            self._matching(tenant, where),
            lambda r: (r.start_time, r.trace_id, r.span_id),
            after,
            limit,
            newest_first=True,
        )

    async def newest_invocation(self, tenant: str, session: SessionRef) -> SpanRow | None:
        invocations = [
            r for r in self._matching(tenant, SpanFilter(session=session))
            if r.is_invocation and r.platform
        ]
        return max(invocations, key=lambda r: r.start_time, default=None)

    async def has_trace(self, tenant: str, session: SessionRef, trace_id: str) -> bool:
        return bool(self._matching(tenant, SpanFilter(session=session, trace_id=trace_id)))

    async def list_traces(
        self, tenant: TenantScope, where: SpanFilter, after: Key | None, limit: int
    ) -> list[TraceSummary]:
        first: dict[tuple[str, str], SpanRow] = {}
        for r in sorted(self._matching(tenant, where), key=lambda r: (r.start_time, r.span_id)):
            if r.is_invocation:
                first.setdefault((r.tenant, r.trace_id), r)
        summaries = [
            TraceSummary(
                r.trace_id,
                r.name,
                r.start_time,
                r.duration_ms,
                r.status,
                r.agent,
                r.version,
                r.endpoint,
                r.session,
                sum(s.trace_id == r.trace_id and s.tenant == r.tenant for s in self.rows.values()),
            )
            for r in first.values()
        ]
        return keyset_page(
            summaries, lambda t: (t.start_time, t.trace_id), after, limit, newest_first=True
        )

    async def version_metrics(
        self, tenant: TenantScope, agent: AgentRef, start: datetime | None, end: datetime | None
    ) -> list[VersionMetrics]:
        spans = self._matching(tenant, SpanFilter(agent=agent, start_time=start, end_time=end))
        by_version: dict[str, list[SpanRow]] = {}
        for r in spans:
            if r.version:
                by_version.setdefault(r.version, []).append(r)
        return [_version_metrics(version, rows) for version, rows in by_version.items()]


def _number(value: object) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _version_metrics(version: str, rows: Sequence[SpanRow]) -> VersionMetrics:
    rows = [r for r in rows if r.platform]  # a tenant's own exports never count
    invocations = [r for r in rows if r.is_invocation]
    tools = [r for r in rows if TOOL_ATTR in r.attributes]
    by_model: dict[str, tuple[int, int]] = {}
    for r in rows:
        model = r.attributes.get(MODEL_ATTR)
        if isinstance(model, str):
            tokens_in, tokens_out = by_model.get(model, (0, 0))
            by_model[model] = (
                tokens_in + _number(r.attributes.get(INPUT_TOKENS_ATTR)),
                tokens_out + _number(r.attributes.get(OUTPUT_TOKENS_ATTR)),
            )
    counts = UsageCounts(
        invocations=len(invocations),
        errors=sum(r.status is SpanStatus.ERROR for r in invocations),
        sessions=len({r.session for r in invocations if r.session}),
        tool_calls=len(tools),
        tool_failures=sum(r.status is SpanStatus.ERROR for r in tools),
        input_tokens=sum(_number(r.attributes.get(INPUT_TOKENS_ATTR)) for r in rows),
        output_tokens=sum(_number(r.attributes.get(OUTPUT_TOKENS_ATTR)) for r in rows),
    )
    return VersionMetrics(version, counts, Latency(), tokens_by_model=by_model)


class FakeScoreStore:
    """telemetry's ScoreStore in memory; each version's observations are given as a list."""

    def __init__(self) -> None:
        self.scores: list[Score] = []
        self.observed: dict[str, list[SessionObservation]] = {}
        self.observation_queries: list[ObservationQuery] = []
        # When scores are recorded: equal times, unless a test moves it, so the id breaks ties.
        self.now = datetime(2025, 1, 1, tzinfo=UTC)

    async def insert_score(self, score: NewScore) -> Score:
        stored = Score(**vars(score), id=len(self.scores) + 1, create_time=self.now)
        self.scores.append(stored)
        return stored

    async def list_scores(
        self, tenant: TenantScope, where: ScoreFilter, after: Key | None, limit: int
    ) -> list[Score]:
        matching = [
            s
            for s in self.scores
            if tenant in (None, s.tenant)
            and (where.session is None or s.session == where.session.name)
            and (where.version is None or s.version == where.version.name)
            and (not where.name or s.name == where.name)
        ]
        return keyset_page(
            matching, lambda s: (s.create_time, s.id), after, limit, newest_first=True
        )

    async def observations(self, query: ObservationQuery) -> list[SessionObservation]:
        self.observation_queries.append(query)
        return self.observed.get(query.version.name, [])


class FakeSessionDirectory:
    """The sessions service as telemetry asks it: the sessions a test recorded, per tenant."""

    def __init__(self) -> None:
        self.sessions: dict[tuple[str, str], RecordedSession] = {}

    def record(self, session: RecordedSession, session_id: str) -> None:
        self.sessions[session.tenant, session_id] = session

    async def find_session(self, tenant: str, session: SessionRef) -> RecordedSession | None:
        return self.sessions.get((tenant, session.session))


class FakeLogStore:
    """telemetry's LogStore in memory: the budgets per (tenant, invocation) and the arrival
    order of the SQL."""

    def __init__(self) -> None:
        self.rows: list[LogRow] = []
        self.budgets: dict[tuple[str, str], tuple[int, bool]] = defaultdict(lambda: (0, False))

    async def insert_logs(self, rows: Sequence[LogRow], budget_bytes: int) -> int:
        scopes: dict[tuple[str, str], list[LogRow]] = defaultdict(list)
        for row in rows:
            scopes[(row.tenant, rules.budget_scope(row))].append(row)
        stored = 0
        for scope, group in scopes.items():
            kept = group
            if scope[1]:
                used, truncated = self.budgets[scope]
                kept, used, note = rules.within_budget(group, used, budget_bytes)
                self.budgets[scope] = (used, truncated or note is not None)
                stored -= 0 if note is None or truncated else 1
                kept = kept if note is None or truncated else [*kept, note]
            stored += len(kept)
            self.rows += [replace(r, id=len(self.rows) + i + 1) for i, r in enumerate(kept)]
        return stored

    async def list_logs(
        self, tenant: TenantScope, where: LogFilter, after: Key | None, limit: int
    ) -> list[LogRow]:
        matching = [
            r for r in self.rows
            if tenant in (None, r.tenant) and r.agent == where.agent.name
            and (where.version is None or r.version == where.version.name)
            and (where.session is None or r.session == where.session.name)
            and (not where.invocation_id or r.invocation_id == where.invocation_id)
            and (where.start_time is None or r.time >= where.start_time)
        ]
        return keyset_page(matching, lambda r: (r.id,), after, limit)


class FakeDeliveryStore:
    """Exporters' delivery reports in memory (PgDeliveryStore's behaviour)."""

    def __init__(self) -> None:
        self.backlogs: dict[str, Backlog] = {}
        self.drops: list[DroppedSpans] = []

    async def record_delivery(self, report: DeliveryReport) -> None:
        self.backlogs.pop(report.exporter, None)
        if report.undelivered_since is not None:
            self.backlogs[report.exporter] = Backlog(
                report.exporter, report.undelivered_since, datetime.now(UTC))
        self.drops.extend(report.drops)

    async def backlogs_before(self, end: datetime) -> list[Backlog]:
        return [b for b in self.backlogs.values() if b.undelivered_since < end]

    async def drops_meeting(self, start: datetime, end: datetime) -> list[DroppedSpans]:
        return [d for d in self.drops if d.start < end and d.end >= start]
