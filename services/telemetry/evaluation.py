"""Quality scores, and the analyses over a window: CompareVersions (the candidate against the
baseline, per metric, with the session as the unit and an always-valid interval) and
AnalyzeExperiment (every variant against the control). The statistics are in analysis/; a window
exporters say spans of are missing is never a pass (gaps.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from corral.names import SessionRef, VersionRef
from services.common import tenancy
from services.common.errors import NotFound
from services.common.identity import Caller
from services.common.paging import Page, PageQuery
from services.common.tenancy import Access, SessionOwner
from services.telemetry import analysis, gaps, rules
from services.telemetry.delivery import Deliveries
from services.telemetry.model import (
    USER_ATTR,
    AnalysisScope,
    NewScore,
    ObservationQuery,
    Score,
    ScoreFilter,
    ScoreInput,
    ScoreSource,
    ScoreStore,
    SessionDirectory,
    SpanStore,
    TenantScope,
    Variant,
    VersionComparison,
)


class Evaluation:
    """Scores recorded by callers, and the analyses over the sessions' spans and scores."""

    def __init__(
        self, scores: ScoreStore, spans: SpanStore, sessions: SessionDirectory,
        deliveries: Deliveries,
    ) -> None:
        self._scores = scores
        self._spans = spans
        self._sessions = sessions
        self._deliveries = deliveries

    async def record_score(self, caller: Caller, score: ScoreInput) -> Score:
        """Stores a score on a session of the caller's tenant (and on one of its traces, when
        named), pinned to the version the session ran on. An operator scores any session of the
        tenant; an invoker only its own, and its score is user feedback (source USER)."""
        rules.check_score(score)
        session, tenant = score.session, tenancy.acting_tenant(caller)
        owner, ran_on = await self._scored_session(tenant, session)
        tenancy.check_session(caller, owner, Access.WRITE, session.name)
        source = score.source if tenancy.manages_sessions(caller) else ScoreSource.USER
        if score.trace_id and not await self._spans.has_trace(tenant, session, score.trace_id):
            raise NotFound(f"trace {score.trace_id} is not a trace of {session}")
        scored = (score.trace_id, score.name, score.value, source, score.comment)
        new = NewScore(session.name, *scored, *ran_on, tenant, caller.user)
        return await self._scores.insert_score(new)

    async def _scored_session(
        self, tenant: str, session: SessionRef
    ) -> tuple[SessionOwner, tuple[str, str, str]]:
        """Whose the session is, and the (agent, version, endpoint) a score on it counts for."""
        pin = await self._spans.newest_invocation(tenant, session)
        if pin is not None:
            # The version the session ran last, as its spans name it, for the user they ran for.
            user = pin.attributes.get(USER_ATTR)
            owner = SessionOwner(tenant, user if isinstance(user, str) else "")
            return owner, (pin.agent, pin.version, pin.endpoint)
        # Spans arrive in batches (exporters flush every 500 ms): a session scored right after
        # it ran may have none here yet. The sessions service knows whether it exists.
        recorded = await self._sessions.find_session(tenant, session)
        if recorded is None:
            raise tenancy.not_found(session.name)
        owner = SessionOwner(recorded.tenant, recorded.user)
        return owner, (recorded.agent, recorded.version, recorded.endpoint)

    async def list_scores(
        self, caller: Caller, where: ScoreFilter, page_size: int, page_token: str
    ) -> Page[Score]:
        tenant = tenancy.readable_tenant(caller, "scores")
        query = PageQuery.start(
            "ListScores",
            owner=tenant or "",
            where=where,
            page_size=page_size,
            token=page_token,
            key_shape=(datetime, int),
        )
        rows = await self._scores.list_scores(tenant, where, query.after, query.fetch_limit)
        return query.page(rows, key=lambda s: (s.create_time, s.id))

    async def _observed(
        self, tenant: TenantScope, scope: AnalysisScope, version: VersionRef,
        specs: Sequence[analysis.MetricSpec],
    ) -> list[analysis.SessionObservation]:
        start, end = rules.checked_window(scope)
        query = ObservationQuery(
            tenant, version, start, end, scope.endpoint, rules.score_names(specs)
        )
        return await self._scores.observations(query)

    async def compare(
        self, caller: Caller, comparison: VersionComparison
    ) -> analysis.RolloutAnalysis:
        """Over the sessions of the caller's tenant (every tenant's for a service acting for
        all)."""
        tenant = tenancy.readable_tenant(caller, "comparisons")
        specs, config = rules.comparison_plan(comparison)
        base = await self._observed(tenant, comparison.scope, comparison.baseline, specs)
        cand = await self._observed(tenant, comparison.scope, comparison.candidate, specs)
        result = analysis.analyze_rollout(base, cand, specs, config)
        return gaps.hold_rollout(result, await self._missing(comparison.scope))

    async def _missing(self, scope: AnalysisScope) -> str:
        return await self._deliveries.missing(*rules.checked_window(scope))

    async def analyze_experiment(
        self, caller: Caller, scope: AnalysisScope, variants: Sequence[Variant]
    ) -> analysis.ExperimentAnalysis:
        """The sessions each variant had are the sample-ratio check's observed counts; those of
        the caller's tenant, as compare()."""
        tenant = tenancy.readable_tenant(caller, "experiments")
        specs, config = rules.experiment_plan(scope, variants)
        observed = {
            v.version.name: await self._observed(tenant, scope, v.version, specs)
            for v in variants
        }
        split = {v.version.name: v.percent for v in variants}
        control = variants[0].version.name
        result = analysis.analyze_experiment(observed, split, control, specs, config)
        return gaps.hold_experiment(result, await self._missing(scope))
