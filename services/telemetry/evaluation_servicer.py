"""gRPC ↔ evaluation: RecordScore, ListScores and CompareVersions on the TelemetryService."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc

from corral.telemetry.v1 import telemetry_pb2 as pb
from services.common.identity import caller
from services.common.paging import paged
from services.common.timestamps import optional_time, timestamp
from services.telemetry import analysis
from services.telemetry.evaluation import Evaluation, MetricRequest
from services.telemetry.evaluation_store import ScoreRow
from services.telemetry.servicer import TelemetryServicer
from services.telemetry.spans import Telemetry

_SOURCE_TO_PB = {"HUMAN": pb.SCORE_SOURCE_HUMAN, "JUDGE": pb.SCORE_SOURCE_JUDGE,
                 "CODE": pb.SCORE_SOURCE_CODE, "USER": pb.SCORE_SOURCE_USER}
_SOURCE_FROM_PB = {v: k for k, v in _SOURCE_TO_PB.items()}
_VERDICT = {analysis.Verdict.PASS: pb.VERDICT_PASS, analysis.Verdict.FAIL: pb.VERDICT_FAIL,
            analysis.Verdict.INCONCLUSIVE: pb.VERDICT_INCONCLUSIVE}
_DIRECTION = {analysis.Direction.LOWER_IS_BETTER: pb.METRIC_DIRECTION_LOWER_IS_BETTER,
              analysis.Direction.HIGHER_IS_BETTER: pb.METRIC_DIRECTION_HIGHER_IS_BETTER}


def score_pb(s: ScoreRow) -> pb.Score:
    return pb.Score(
        name=f"scores/{s.id}", session=s.session, trace_id=s.trace_id, score_name=s.name, value=s.value,
        source=_SOURCE_TO_PB.get(s.source, pb.SCORE_SOURCE_UNSPECIFIED), comment=s.comment, version=s.version,
        create_time=timestamp(s.create_time), user=s.user,
    )


def comparison_pb(c: analysis.MetricComparison, baseline: str, candidate: str, relative: bool) -> pb.MetricComparison:
    return pb.MetricComparison(
        metric=pb.MetricSpec(name=c.metric, direction=_DIRECTION[c.direction], tolerance=c.tolerance,
                             relative=relative),
        baseline=pb.ArmStats(version=baseline, sessions=c.baseline.sessions, invocations=c.baseline.invocations,
                             estimate=c.baseline.estimate),
        candidate=pb.ArmStats(version=candidate, sessions=c.candidate.sessions,
                              invocations=c.candidate.invocations, estimate=c.candidate.estimate),
        difference=c.difference, ci_low=c.lower, ci_high=c.upper, tolerance=c.tolerance,
        verdict=_VERDICT[c.verdict], explanation=c.reason,
    )


def _metric_request(m: pb.MetricSpec) -> MetricRequest:
    return MetricRequest(
        name=m.name,
        direction=pb.MetricDirection.Name(m.direction).removeprefix("METRIC_DIRECTION_") if m.direction else "",
        tolerance=m.tolerance if m.HasField("tolerance") else None,
        relative=m.relative if m.HasField("relative") else None,
        fail_margin=m.fail_margin if m.HasField("fail_margin") else None,
    )


class EvaluationServicer(TelemetryServicer):
    def __init__(self, telemetry: Telemetry, evaluation: Evaluation) -> None:
        super().__init__(telemetry)
        self._evaluation = evaluation

    async def RecordScore(self, request: pb.RecordScoreRequest, context: grpc.aio.ServicerContext) -> pb.Score:
        s = request.score
        row = await self._evaluation.record_score(
            caller(context), s.session, s.score_name, s.value, s.trace_id,
            _SOURCE_FROM_PB.get(s.source, "HUMAN"), s.comment,
        )
        return score_pb(row)

    async def ListScores(self, request: pb.ListScoresRequest, context: grpc.aio.ServicerContext) -> pb.ListScoresResponse:
        rows, token = await paged(request, lambda o, n: self._evaluation.list_scores(
            caller(context), request.filter.session, request.filter.version, request.score_name, o, n))
        return pb.ListScoresResponse(scores=[score_pb(r) for r in rows], next_page_token=token)

    async def AnalyzeExperiment(
        self, request: pb.AnalyzeExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.AnalyzeExperimentResponse:
        metrics = [_metric_request(m) for m in request.metrics]
        variants = [(v.version, v.percent) for v in request.variants]
        result, sessions = await self._evaluation.analyze_experiment(
            request.agent, variants, optional_time(request, "start_time"), optional_time(request, "end_time"), metrics,
            request.alpha, request.endpoint,
        )
        out = pb.AnalyzeExperimentResponse(
            sessions=[sessions[v] for v, _ in variants], sample_ratio_p_value=result.sample_ratio.p_value,
            sample_ratio_mismatch=result.sample_ratio.mismatch, warning=result.warning,
        )
        for m in result.metrics:
            item = out.metrics.add(metric=pb.MetricSpec(name=m.metric, direction=_DIRECTION[m.direction]), unit=m.unit)
            for v in m.variants:
                vm = item.variants.add(version=v.variant, sessions=v.sessions, estimate=v.estimate,
                                       ci_low=v.lower, ci_high=v.upper, control=v.effect is None)
                if v.effect is not None:
                    vm.effect, vm.effect_low, vm.effect_high = v.effect, v.effect_lower or 0.0, v.effect_upper or 0.0
        return out

    async def CompareVersions(
        self, request: pb.CompareVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompareVersionsResponse:
        metrics = [_metric_request(m) for m in request.metrics]
        result = await self._evaluation.compare(
            request.agent, request.baseline_version, request.candidate_version, optional_time(request, "start_time"),
            optional_time(request, "end_time"), metrics, request.min_sessions, request.alpha, request.endpoint,
        )
        relative = {m.name: bool(m.relative) for m in metrics}
        return pb.CompareVersionsResponse(
            comparisons=[comparison_pb(c, request.baseline_version, request.candidate_version,
                                       relative.get(c.metric, False)) for c in result.comparisons],
            verdict=_VERDICT[result.verdict], evaluate_time=timestamp(datetime.now(UTC)),
        )
