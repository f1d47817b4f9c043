"""Telemetry's domain values as corral.telemetry.v1 messages, and the enums both ways: the
conversions servicer.py answers with."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf import struct_pb2
from google.protobuf.message import Message

from corral.telemetry.v1 import telemetry_pb2 as pb
from services.common.errors import InvalidArgument
from services.common.paging import Page
from services.common.timestamps import optional_time, timestamp
from services.telemetry import analysis
from services.telemetry.gaps import DeliveryReport, DroppedSpans
from services.telemetry.log_model import LogPage
from services.telemetry.model import (
    Attributes,
    Score,
    ScoreSource,
    SpanRow,
    SpanStatus,
    TraceSummary,
    Variant,
    VersionComparison,
    VersionMetrics,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

M = TypeVar("M", bound=Message)

_STATUS = {
    SpanStatus.UNSET: pb.SPAN_STATUS_UNSPECIFIED,
    SpanStatus.OK: pb.SPAN_STATUS_OK,
    SpanStatus.ERROR: pb.SPAN_STATUS_ERROR,
}
SOURCE_TO_PB = {
    ScoreSource.HUMAN: pb.SCORE_SOURCE_HUMAN,
    ScoreSource.JUDGE: pb.SCORE_SOURCE_JUDGE,
    ScoreSource.CODE: pb.SCORE_SOURCE_CODE,
    ScoreSource.USER: pb.SCORE_SOURCE_USER,
}
SOURCE_FROM_PB = {v: k for k, v in SOURCE_TO_PB.items()}
_VERDICT = {
    analysis.Verdict.PASS: pb.VERDICT_PASS,
    analysis.Verdict.FAIL: pb.VERDICT_FAIL,
    analysis.Verdict.INCONCLUSIVE: pb.VERDICT_INCONCLUSIVE,
}
DIRECTION_TO_PB = {
    analysis.Direction.LOWER_IS_BETTER: pb.METRIC_DIRECTION_LOWER_IS_BETTER,
    analysis.Direction.HIGHER_IS_BETTER: pb.METRIC_DIRECTION_HIGHER_IS_BETTER,
}


def _message(cls: type[M], value: DataclassInstance, **converted: Any) -> M:
    """A `cls` with the fields of `value` that `cls` has by the same name, and `converted` for
    those whose type (or meaning) differs. Any: each field's type is the message's to check."""
    names = cls.DESCRIPTOR.fields_by_name
    same = {
        f.name: getattr(value, f.name)
        for f in dataclasses.fields(value)
        if f.name in names and f.name not in converted
    }
    return cls(**same, **converted)


def _struct(values: Attributes) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def logs_response(page: LogPage) -> pb.ListLogsResponse:
    return pb.ListLogsResponse(
        records=[_message(pb.LogRecord, r, time=timestamp(r.time)) for r in page.items],
        next_page_token=page.next_page_token,
        follow_token=page.follow_token,
    )


def span_pb(row: SpanRow) -> pb.Span:
    return _message(
        pb.Span,
        row,
        start_time=timestamp(row.start_time),
        end_time=timestamp(row.end_time),
        status=_STATUS[row.status],
        attributes=_struct(row.attributes),
        events=[
            pb.SpanEvent(name=e.name, time=timestamp(e.time), attributes=_struct(e.attributes))
            for e in row.events
        ],
    )


def trace_pb(summary: TraceSummary) -> pb.TraceSummary:
    return _message(
        pb.TraceSummary,
        summary,
        start_time=timestamp(summary.start_time),
        status=_STATUS[summary.status],
    )


def spans_response(page: Page[SpanRow]) -> pb.ListSpansResponse:
    spans = [span_pb(row) for row in page.items]
    return pb.ListSpansResponse(spans=spans, next_page_token=page.next_page_token)


def traces_response(page: Page[TraceSummary]) -> pb.ListTracesResponse:
    traces = [trace_pb(t) for t in page.items]
    return pb.ListTracesResponse(traces=traces, next_page_token=page.next_page_token)


def version_metrics_pb(m: VersionMetrics) -> pb.VersionMetrics:
    return _message(
        pb.VersionMetrics,
        m.counts,
        version=m.version,
        error_rate=m.counts.error_rate,
        tool_failure_rate=m.counts.tool_failure_rate,
        latency_p50_ms=m.latency.p50_ms,
        latency_p95_ms=m.latency.p95_ms,
        latency_p99_ms=m.latency.p99_ms,
        cost_usd=m.cost_usd,
        unpriced_models=m.unpriced_models,
    )


def score_pb(s: Score) -> pb.Score:
    return _message(
        pb.Score,
        s,
        name=s.resource_name,  # the score's own name is its score_name
        score_name=s.name,
        source=SOURCE_TO_PB[s.source],
        create_time=timestamp(s.create_time),
    )


def _comparison_pb(
    c: analysis.MetricComparison, request: VersionComparison, relative: bool
) -> pb.MetricComparison:
    def arm(version: str, evidence: analysis.ArmEvidence) -> pb.ArmStats:
        return _message(pb.ArmStats, evidence, version=version)

    metric = pb.MetricSpec(
        name=c.spec.name,
        direction=DIRECTION_TO_PB[c.spec.direction],
        tolerance=c.tolerance,
        relative=relative,
    )
    return _message(
        pb.MetricComparison,
        c,
        metric=metric,
        baseline=arm(request.baseline.name, c.baseline),
        candidate=arm(request.candidate.name, c.candidate),
        ci_low=c.lower,
        ci_high=c.upper,
        verdict=_VERDICT[c.verdict],
        explanation=c.reason,
    )


def comparison_response(
    result: analysis.RolloutAnalysis, request: VersionComparison, evaluate_time: datetime
) -> pb.CompareVersionsResponse:
    relative = {m.name: bool(m.relative) for m in request.scope.metrics}
    comparisons = [
        _comparison_pb(c, request, relative.get(c.metric, False)) for c in result.comparisons
    ]
    return pb.CompareVersionsResponse(
        comparisons=comparisons,
        verdict=_VERDICT[result.verdict],
        evaluate_time=timestamp(evaluate_time),
        reason=result.reason,
        missing_data=result.missing_data,
    )


def experiment_response(
    result: analysis.ExperimentAnalysis, variants: Sequence[Variant]
) -> pb.AnalyzeExperimentResponse:
    sessions = result.sample_ratio.observed
    out = pb.AnalyzeExperimentResponse(
        sessions=[sessions[v.version.name] for v in variants],
        sample_ratio_p_value=result.sample_ratio.p_value,
        sample_ratio_mismatch=result.sample_ratio.mismatch,
        warning=result.warning,
        missing_data=result.missing_data,
    )
    for m in result.metrics:
        metric = pb.MetricSpec(name=m.spec.name, direction=DIRECTION_TO_PB[m.spec.direction])
        item = out.metrics.add(metric=metric, unit=m.spec.unit)
        for v in m.variants:
            variant = item.variants.add(
                version=v.variant,
                sessions=v.sessions,
                estimate=v.estimate,
                ci_low=v.lower,
                ci_high=v.upper,
                control=v.variant == result.control,
            )
            if not variant.control:
                # A variant without data yet (or a control without any) has no effect: NaN, as
                # an empty window's estimate is, so it reads as "no data" and never as 0.
                variant.effect, variant.effect_low, variant.effect_high = (
                    (v.effect, v.effect_lower or 0.0, v.effect_upper or 0.0)
                    if v.effect is not None else (math.nan, math.nan, math.nan)
                )
    return out


def delivery_report(request: pb.ReportDeliveryRequest) -> DeliveryReport:
    return DeliveryReport(
        exporter=request.exporter,
        undelivered_since=optional_time(request, "undelivered_since"),
        drops=tuple(_dropped(request.exporter, d, i) for i, d in enumerate(request.drops)),
    )


def _dropped(exporter: str, d: pb.DroppedSpans, i: int) -> DroppedSpans:
    start = optional_time(d, "start_time", f"drops[{i}].start_time")
    end = optional_time(d, "end_time", f"drops[{i}].end_time")
    if start is None or end is None:
        raise InvalidArgument.field(f"drops[{i}]", "give the dropped spans' start_time and end_time")
    return DroppedSpans(exporter, start, end, d.count)
