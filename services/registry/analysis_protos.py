"""Telemetry's analysis messages ↔ the registry's analysis values: version comparisons and
experiment analyses (metric specs: services.common.metric_protos). Shared by the servicer (rollouts carry them) and the client
(telemetry computes them)."""

from __future__ import annotations

import dataclasses

from corral.telemetry.v1 import telemetry_pb2 as tel
from services.common.metric_protos import metric_from_pb, metric_pb
from services.common.timestamps import optional_time, timestamp
from services.registry.rollout_model import (
    Analysis,
    ArmStats,
    Comparison,
    ExperimentAnalysis,
    ExperimentMetric,
    VariantMetric,
    Verdict,
)

# The verdicts' names are the messages' enum names without their prefix.
_VERDICT_TO_PB = {v: tel.Verdict.Value(f"VERDICT_{v.value}") for v in Verdict}
_VERDICT_FROM_PB = {v: k for k, v in _VERDICT_TO_PB.items()}


def _arm_from_pb(a: tel.ArmStats) -> ArmStats:
    return ArmStats(a.version, a.sessions, a.invocations, a.estimate, a.ci_low, a.ci_high)


def _arm_pb(a: ArmStats) -> tel.ArmStats:
    return tel.ArmStats(**dataclasses.asdict(a))  # the same fields by the same names


def _verdict_from_pb(v: tel.Verdict.ValueType) -> Verdict:
    # Telemetry leaves no verdict only when it has none to give.
    return _VERDICT_FROM_PB.get(v, Verdict.INCONCLUSIVE)


def analysis_from_pb(response: tel.CompareVersionsResponse) -> Analysis:
    return Analysis(
        verdict=_verdict_from_pb(response.verdict),
        comparisons=tuple(
            Comparison(
                metric=metric_from_pb(c.metric),
                baseline=_arm_from_pb(c.baseline) if c.HasField("baseline") else None,
                candidate=_arm_from_pb(c.candidate) if c.HasField("candidate") else None,
                difference=c.difference, ci_low=c.ci_low, ci_high=c.ci_high,
                tolerance=c.tolerance, verdict=_verdict_from_pb(c.verdict),
                explanation=c.explanation,
            )
            for c in response.comparisons
        ),
        evaluate_time=optional_time(response, "evaluate_time"),
        reason=response.reason,
        missing_data=response.missing_data,
    )


def analysis_pb(a: Analysis) -> tel.CompareVersionsResponse:
    out = tel.CompareVersionsResponse(
        verdict=_VERDICT_TO_PB[a.verdict], reason=a.reason, missing_data=a.missing_data
    )
    for c in a.comparisons:
        comparison = out.comparisons.add(
            metric=metric_pb(c.metric), difference=c.difference, ci_low=c.ci_low,
            ci_high=c.ci_high, tolerance=c.tolerance, verdict=_VERDICT_TO_PB[c.verdict],
            explanation=c.explanation,
        )
        if c.baseline is not None:
            comparison.baseline.CopyFrom(_arm_pb(c.baseline))
        if c.candidate is not None:
            comparison.candidate.CopyFrom(_arm_pb(c.candidate))
    if a.evaluate_time is not None:
        out.evaluate_time.CopyFrom(timestamp(a.evaluate_time))
    return out


def experiment_analysis_from_pb(response: tel.AnalyzeExperimentResponse) -> ExperimentAnalysis:
    return ExperimentAnalysis(
        metrics=tuple(
            ExperimentMetric(
                metric=metric_from_pb(m.metric),
                unit=m.unit,
                variants=tuple(
                    VariantMetric(v.version, v.sessions, v.estimate, v.ci_low, v.ci_high,
                                  v.control, v.effect, v.effect_low, v.effect_high)
                    for v in m.variants
                ),
            )
            for m in response.metrics
        ),
        sessions=tuple(response.sessions),
        sample_ratio_p_value=response.sample_ratio_p_value,
        sample_ratio_mismatch=response.sample_ratio_mismatch,
        warning=response.warning,
        missing_data=response.missing_data,
    )


def experiment_analysis_pb(a: ExperimentAnalysis) -> tel.AnalyzeExperimentResponse:
    return tel.AnalyzeExperimentResponse(
        metrics=[
            tel.ExperimentMetricResult(
                metric=metric_pb(m.metric),
                unit=m.unit,
                # The same fields by the same names.
                variants=[tel.VariantMetric(**dataclasses.asdict(v)) for v in m.variants],
            )
            for m in a.metrics
        ],
        sessions=list(a.sessions),
        sample_ratio_p_value=a.sample_ratio_p_value,
        sample_ratio_mismatch=a.sample_ratio_mismatch,
        warning=a.warning,
        missing_data=a.missing_data,
    )
