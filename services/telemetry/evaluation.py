"""Quality scores, and CompareVersions: the candidate against the baseline over the same window,
per metric, with the session as the unit and an always-valid interval (see analysis/)."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from corral import names
from services.common.errors import InvalidArgument, NotFound
from services.common.identity import Caller
from services.telemetry import analysis
from services.telemetry.evaluation_store import EvaluationStore, ScoreRow
from services.telemetry.spans import attributes_dict

log = logging.getLogger(__name__)

SCORE_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
SOURCES = ("HUMAN", "JUDGE", "CODE", "USER")


@dataclass(frozen=True)
class MetricRequest:
    name: str
    direction: str = ""  # LOWER_IS_BETTER / HIGHER_IS_BETTER / "" for the metric's default
    tolerance: float | None = None
    relative: bool | None = None
    fail_margin: float | None = None


def metric_spec(m: MetricRequest, field: str) -> analysis.MetricSpec:
    try:
        analysis.check_metric_name(m.name)
    except ValueError as exc:
        raise InvalidArgument.field(f"{field}.name", str(exc)) from None
    if m.name.startswith("score:") and not SCORE_NAME.match(m.name[6:]):
        raise InvalidArgument.field(f"{field}.name", f"{m.name!r}: a score name is lowercase letters, digits, _ . -")
    direction = {"LOWER_IS_BETTER": analysis.Direction.LOWER_IS_BETTER,
                 "HIGHER_IS_BETTER": analysis.Direction.HIGHER_IS_BETTER}.get(m.direction)
    tolerance = None
    if m.tolerance is not None:
        if not math.isfinite(m.tolerance) or m.tolerance < 0:
            raise InvalidArgument.field(f"{field}.tolerance", f"{m.tolerance} must be a number >= 0")
        tolerance = analysis.Threshold(m.tolerance, relative=bool(m.relative))
    margin = None
    if m.fail_margin is not None:
        if not math.isfinite(m.fail_margin) or m.fail_margin < 0:
            raise InvalidArgument.field(f"{field}.fail_margin", f"{m.fail_margin} must be a number >= 0")
        margin = analysis.Threshold(m.fail_margin, relative=bool(m.relative))
    # The tolerance is the bar for passing. Failing starts at the metric's fail margin: the
    # tolerance itself unless given, except for the session error rate, which by default fails on
    # any degradation the evidence establishes (what rolls a bad candidate back in ~100 sessions).
    try:
        return analysis.metric(m.name, tolerance=tolerance, direction=direction, fail_margin=margin)
    except ValueError as exc:
        raise InvalidArgument.field(f"{field}.fail_margin", str(exc)) from None


EVALUATION_EVENT = "gen_ai.evaluation.result"


def scores_in_export(request: ExportTraceServiceRequest, default_tenant: str) -> list[dict[str, Any]]:
    """Scores an agent recorded as gen_ai.evaluation.result span events (corral.sdk ctx.score)."""
    found = []
    for rs in request.resource_spans:
        resource = attributes_dict(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                events = [e for e in span.events if e.name == EVALUATION_EVENT]
                if not events:
                    continue
                attrs = attributes_dict(span.attributes)

                def text(key: str, attrs: dict[str, Any] = attrs, resource: dict[str, Any] = resource) -> str:
                    return str(attrs.get(key) or resource.get(key) or "")

                for event in events:
                    ev = attributes_dict(event.attributes)
                    name, value = ev.get("gen_ai.evaluation.name"), ev.get("gen_ai.evaluation.score.value")
                    if not isinstance(name, str) or not SCORE_NAME.match(name) or not isinstance(value, (int, float)) \
                            or not 0.0 <= float(value) <= 1.0 or not text("corral.session"):
                        log.warning("ignoring an evaluation event without a valid name, value in [0, 1] or session")
                        continue
                    found.append({
                        "session": text("corral.session"), "trace_id": span.trace_id.hex(), "name": name,
                        "value": float(value), "source": "CODE", "comment": str(ev.get("gen_ai.evaluation.explanation", "")),
                        "agent": text("corral.agent"), "version": text("corral.version"),
                        "endpoint": text("corral.endpoint"), "tenant": text("corral.tenant") or default_tenant,
                        "user": "agent",
                    })
    return found


class Evaluation:
    def __init__(self, store: EvaluationStore) -> None:
        self.store = store

    async def record_score(
        self, caller: Caller, session: str, name: str, value: float, trace_id: str, source: str, comment: str
    ) -> ScoreRow:
        try:
            names.parse_session(session)
        except names.ResourceNameError as exc:
            raise InvalidArgument.field("score.session", str(exc)) from None
        if not SCORE_NAME.match(name):
            raise InvalidArgument.field("score.score_name", f"{name!r}: use lowercase letters, digits, _ . - (e.g. clinical_accuracy)")
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise InvalidArgument.field(
                "score.value", f"{value} is outside [0, 1]; normalise it (a 4 out of 5 is 0.8, accepted is 1)")
        if source not in SOURCES:
            raise InvalidArgument.field("score.source", f"{source!r} is not one of {', '.join(SOURCES)}")
        if len(comment) > 4000:
            raise InvalidArgument.field("score.comment", "is longer than 4000 characters")
        pin = await self.store.session_pin(caller.tenant, session)
        if pin is None:
            raise NotFound(f"{session} has no invocations in tenant {caller.tenant!r}; score a session that ran")
        if trace_id and not await self.store.trace_in_session(caller.tenant, session, trace_id):
            raise NotFound(f"trace {trace_id} is not a trace of {session}")
        agent, version, endpoint = pin
        return await self.store.insert_score(
            session=session, trace_id=trace_id, name=name, value=value, source=source, comment=comment,
            agent=agent, version=version, endpoint=endpoint, tenant=caller.tenant, user=caller.user,
        )

    async def record_exported_scores(self, request: ExportTraceServiceRequest, default_tenant: str) -> int:
        scores = scores_in_export(request, default_tenant)
        for score in scores:
            await self.store.insert_score(**score)
        return len(scores)

    async def list_scores(
        self, caller: Caller, session: str, version: str, name: str, offset: int, limit: int
    ) -> list[ScoreRow]:
        return await self.store.list_scores(caller.tenant, session, version, name, offset, limit)

    async def compare(
        self, agent: str, baseline: str, candidate: str, start: datetime | None, end: datetime | None,
        metrics: list[MetricRequest], min_sessions: int, alpha: float, endpoint: str,
    ) -> analysis.RolloutAnalysis:
        for field, value in (("baseline_version", baseline), ("candidate_version", candidate)):
            try:
                ref = names.parse_version(value)
            except names.ResourceNameError as exc:
                raise InvalidArgument.field(field, str(exc)) from None
            if names.agent_name(ref.agent) != agent:
                raise InvalidArgument.field(field, f"{value} is not a version of {agent}")
        if baseline == candidate:
            raise InvalidArgument.field("candidate_version", "must differ from baseline_version")
        if start is None or end is None or end <= start:
            raise InvalidArgument.field("start_time", "give a window: start_time before end_time")
        if alpha and not 0 < alpha < 1:
            raise InvalidArgument.field("alpha", f"{alpha} must be in (0, 1)")
        if min_sessions < 0:
            raise InvalidArgument.field("min_sessions", "must not be negative")
        specs = [metric_spec(m, f"metrics[{i}]") for i, m in enumerate(metrics)] or list(analysis.DEFAULT_METRICS)
        if len({s.name for s in specs}) != len(specs):
            raise InvalidArgument.field("metrics", "a metric is listed twice")
        config = analysis.AnalysisConfig(alpha=alpha or 0.05, min_sessions=max(1, min_sessions or 200))
        scores = [s.name[6:] for s in specs if s.name.startswith("score:")]
        base = await self.store.observations(baseline, start, end, endpoint, scores)
        cand = await self.store.observations(candidate, start, end, endpoint, scores)
        return analysis.analyze_rollout(base, cand, specs, config)



    async def analyze_experiment(
        self, agent: str, variants: list[tuple[str, float]], start: datetime | None, end: datetime | None,
        metrics: list[MetricRequest], alpha: float, endpoint: str,
    ) -> tuple[analysis.ExperimentAnalysis, dict[str, int]]:
        if len(variants) < 2:
            raise InvalidArgument.field("variants", "an experiment needs a control and at least one variant")
        for i, (version, percent) in enumerate(variants):
            try:
                ref = names.parse_version(version)
            except names.ResourceNameError as exc:
                raise InvalidArgument.field(f"variants[{i}].version", str(exc)) from None
            if names.agent_name(ref.agent) != agent:
                raise InvalidArgument.field(f"variants[{i}].version", f"{version} is not a version of {agent}")
            if not 0 < percent <= 100:
                raise InvalidArgument.field(f"variants[{i}].percent", f"{percent} must be > 0 and <= 100")
        if len({v for v, _ in variants}) != len(variants):
            raise InvalidArgument.field("variants", "a version is listed twice")
        if start is None or end is None or end <= start:
            raise InvalidArgument.field("start_time", "give a window: start_time before end_time")
        specs = [metric_spec(m, f"metrics[{i}]") for i, m in enumerate(metrics)] or list(analysis.DEFAULT_METRICS)
        scores = [sp.name[6:] for sp in specs if sp.name.startswith("score:")]
        observed = {v: await self.store.observations(v, start, end, endpoint, scores) for v, _ in variants}
        config = dataclasses.replace(analysis.EXPERIMENT_CONFIG, alpha=alpha or analysis.EXPERIMENT_CONFIG.alpha)
        result = analysis.analyze_experiment(observed, dict(variants), variants[0][0], specs, config)
        return result, {v: len(obs) for v, obs in observed.items()}
