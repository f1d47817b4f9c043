"""Quality scores, and the analyses over a window: CompareVersions (the candidate against the
baseline, per metric, with the session as the unit and an always-valid interval) and
AnalyzeExperiment (every variant against the control). The statistics are in analysis/."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from corral.names import VersionRef
from services.common.errors import NotFound
from services.common.identity import Caller
from services.common.paging import Page, PageQuery
from services.telemetry import analysis, rules
from services.telemetry.model import (
    AnalysisScope,
    NewScore,
    ObservationQuery,
    Score,
    ScoreFilter,
    ScoreInput,
    ScoreStore,
    SpanStore,
    Variant,
    VersionComparison,
)


class Evaluation:
    """Scores recorded by callers, and the analyses over the sessions' spans and scores."""

    def __init__(self, scores: ScoreStore, spans: SpanStore) -> None:
        self._scores = scores
        self._spans = spans

    async def record_score(self, caller: Caller, score: ScoreInput) -> Score:
        """Stores a score on a session of the caller's tenant that ran (and on one of its traces,
        when named), pinned to the version the session ran on."""
        rules.check_score(score)
        session, tenant = score.session, caller.tenant
        pin = await self._spans.newest_invocation(tenant, session)
        if pin is None:
            raise NotFound(
                f"{session} has no invocations in tenant {tenant!r}; score a session that ran"
            )
        if score.trace_id and not await self._spans.has_trace(tenant, session, score.trace_id):
            raise NotFound(f"trace {score.trace_id} is not a trace of {session}")
        # The score counts for the version the session ran last, as its spans name it.
        scored = (score.trace_id, score.name, score.value, score.source, score.comment)
        ran_on = (pin.agent, pin.version, pin.endpoint)
        new = NewScore(session.name, *scored, *ran_on, tenant, caller.user)
        return await self._scores.insert_score(new)

    async def list_scores(
        self, caller: Caller, where: ScoreFilter, page_size: int, page_token: str
    ) -> Page[Score]:
        query = PageQuery.start(
            "ListScores",
            owner=caller.tenant,
            where=where,
            page_size=page_size,
            token=page_token,
            key_shape=(datetime, int),
        )
        rows = await self._scores.list_scores(caller.tenant, where, query.after, query.fetch_limit)
        return query.page(rows, key=lambda s: (s.create_time, s.id))

    async def _observed(
        self, scope: AnalysisScope, version: VersionRef, specs: Sequence[analysis.MetricSpec]
    ) -> list[analysis.SessionObservation]:
        start, end = rules.checked_window(scope)
        query = ObservationQuery(version, start, end, scope.endpoint, rules.score_names(specs))
        return await self._scores.observations(query)

    async def compare(self, comparison: VersionComparison) -> analysis.RolloutAnalysis:
        specs, config = rules.comparison_plan(comparison)
        base = await self._observed(comparison.scope, comparison.baseline, specs)
        cand = await self._observed(comparison.scope, comparison.candidate, specs)
        return analysis.analyze_rollout(base, cand, specs, config)

    async def analyze_experiment(
        self, scope: AnalysisScope, variants: Sequence[Variant]
    ) -> analysis.ExperimentAnalysis:
        """The sessions each variant had are the sample-ratio check's observed counts."""
        specs, config = rules.experiment_plan(scope, variants)
        observed = {v.version.name: await self._observed(scope, v.version, specs) for v in variants}
        split = {v.version.name: v.percent for v in variants}
        control = variants[0].version.name
        return analysis.analyze_experiment(observed, split, control, specs, config)
