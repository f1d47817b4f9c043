"""The JSON forms of the registry's values, in the shapes stored rows already hold: rollout and
experiment specs, analyses (as telemetry's messages print them, with short verdicts), manifests,
traffic. The one place values become JSON and come back."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

from corral.manifest import Manifest, Tool
from services.common.endpoints import TrafficShare
from services.common.execution import StartFailure
from services.common.metric_spec import Direction, MetricSpec
from services.registry.model import JsonValue
from services.registry.rollout_model import (
    Analysis,
    AnalysisConfig,
    AnalysisGate,
    ArmStats,
    Comparison,
    ExperimentAnalysis,
    ExperimentSpec,
    ManualGate,
    Pause,
    RolloutSpec,
    SessionPolicy,
    SetWeight,
    Step,
    Verdict,
)

# What json.loads returns; the readers below take the parts they know by name.
Json = Any
JsonObject = dict[str, Json]

_DIRECTION_PREFIX = "METRIC_DIRECTION_"
_VERDICT_PREFIX = "VERDICT_"


def dumps(value: object) -> str:
    """JSON text of a value that may hold domain values (an analysis) among plain ones."""
    return json.dumps(value, default=_default)


def _default(value: object) -> object:
    if isinstance(value, Analysis):
        return analysis_json(value)
    if isinstance(value, ExperimentAnalysis):
        return experiment_analysis_json(value)
    return str(value)


def loads_object(text: str) -> dict[str, JsonValue]:
    loaded: dict[str, JsonValue] = json.loads(text)
    return loaded


def evidence_json(evidence: Analysis | ExperimentAnalysis | None) -> JsonObject | None:
    """Evidence as webhooks and the audit log carry it."""
    if evidence is None:
        return None
    return cast(JsonObject, _default(evidence))


# -- traffic and manifests ---------------------------------------------------------------------


def traffic_json(traffic: tuple[TrafficShare, ...]) -> str:
    return json.dumps([[s.version, s.basis_points] for s in traffic])


def traffic_from_json(text: str) -> tuple[TrafficShare, ...]:
    return tuple(TrafficShare(int(v), int(bp)) for v, bp in json.loads(text))


def manifest_json(manifest: Manifest) -> str:
    return json.dumps(dataclasses.asdict(manifest))


def manifest_from_json(text: str) -> Manifest:
    doc: JsonObject = json.loads(text)
    known = {f.name for f in dataclasses.fields(Manifest)}
    fields = {k: v for k, v in doc.items() if k in known}
    fields["tools"] = tuple(Tool(t["name"], t.get("schema", "")) for t in doc.get("tools", ()))
    fields["dependencies"] = tuple(doc.get("dependencies", ()))
    return Manifest(**fields)


def failure_json(failure: StartFailure | None) -> str | None:
    return json.dumps(dataclasses.asdict(failure)) if failure is not None else None


def failure_from_json(text: str | None) -> StartFailure | None:
    if text is None:
        return None
    doc: dict[str, str] = json.loads(text)
    return StartFailure(doc["error_type"], doc["message"], doc.get("traceback", ""))


# -- metrics -----------------------------------------------------------------------------------


def _metric_json(m: MetricSpec) -> JsonObject:
    out: JsonObject = {"name": m.name}
    if m.tolerance is not None:
        out["tolerance"] = m.tolerance
    if m.fail_margin is not None:
        out["fail_margin"] = m.fail_margin
    if m.relative is not None:
        out["relative"] = m.relative
    if m.direction is not None:
        out["direction"] = m.direction.value
    return out


def _metric_from_json(d: Mapping[str, Json]) -> MetricSpec:
    direction = str(d.get("direction") or "").removeprefix(_DIRECTION_PREFIX)
    return MetricSpec(
        name=str(d.get("name", "")),
        direction=Direction(direction) if direction in Direction.__members__ else None,
        tolerance=_optional_float(d.get("tolerance")),
        relative=bool(d["relative"]) if d.get("relative") is not None else None,
        fail_margin=_optional_float(d.get("fail_margin")),
    )


def _optional_float(value: Json) -> float | None:
    return float(value) if value is not None else None


# -- rollout specs -----------------------------------------------------------------------------


def _step_json(step: Step) -> JsonObject:
    match step:
        case SetWeight(percent=w):
            return {"set_weight": w}
        case Pause(seconds=s):
            return {"pause_s": s}
        case AnalysisGate(max_duration_s=s):
            return {"analysis": {"max_duration_s": s}}
        case ManualGate():
            return {"manual": {}}


def _step_from_json(d: Mapping[str, Json]) -> Step:
    if "set_weight" in d:
        return SetWeight(float(d["set_weight"]))
    if "pause_s" in d:
        return Pause(float(d["pause_s"]))
    if "analysis" in d:
        return AnalysisGate(float(d["analysis"]["max_duration_s"]))
    return ManualGate()


def rollout_spec_json(spec: RolloutSpec) -> str:
    doc: JsonObject = {
        "strategy": spec.strategy,
        "steps": [_step_json(s) for s in spec.steps],
        "analysis": {
            "metrics": [_metric_json(m) for m in spec.analysis.metrics],
            "interval_s": spec.analysis.interval_s,
            "min_sessions": spec.analysis.min_sessions,
            "alpha": spec.analysis.alpha,
        },
        # The controller's SQL reads these three (due drains).
        "rollback_policy": spec.rollback_policy.value,
        "drain_timeout_s": spec.drain_timeout_s,
        "webhook_url": spec.webhook_url,
    }
    if spec.drained:
        doc["drained"] = True
    return json.dumps(doc)


def rollout_spec_from_json(text: str) -> RolloutSpec:
    doc: JsonObject = json.loads(text)
    analysis = doc["analysis"]
    return RolloutSpec(
        strategy=str(doc.get("strategy", "")),
        steps=tuple(_step_from_json(s) for s in doc["steps"]),
        analysis=AnalysisConfig(
            metrics=tuple(_metric_from_json(m) for m in analysis["metrics"]),
            interval_s=float(analysis["interval_s"]),
            min_sessions=int(analysis["min_sessions"]),
            alpha=float(analysis["alpha"]),
        ),
        rollback_policy=SessionPolicy(doc["rollback_policy"]),
        drain_timeout_s=int(doc["drain_timeout_s"]),
        webhook_url=str(doc.get("webhook_url", "")),
        drained=bool(doc.get("drained", False)),
    )


def experiment_spec_json(spec: ExperimentSpec) -> str:
    doc: JsonObject = {
        "variants": [[v.version, v.percent] for v in spec.variants],
        "metrics": [_metric_json(m) for m in spec.metrics],
        "end_time": spec.end_time.isoformat() if spec.end_time else None,
        "max_sessions": spec.max_sessions,
        "alpha": spec.alpha,
        "webhook_url": spec.webhook_url,
    }
    if spec.winner is not None:
        doc["winner"] = spec.winner
    return json.dumps(doc)


def experiment_spec_from_json(text: str) -> ExperimentSpec:
    doc: JsonObject = json.loads(text)
    end = doc.get("end_time")
    return ExperimentSpec(
        variants=tuple(TrafficShare(int(v), round(float(p) * 100)) for v, p in doc["variants"]),
        metrics=tuple(_metric_from_json(m) for m in doc["metrics"]),
        end_time=datetime.fromisoformat(end) if end else None,
        max_sessions=int(doc.get("max_sessions") or 0),
        alpha=float(doc.get("alpha", 0.05)),
        webhook_url=str(doc.get("webhook_url", "")),
        winner=int(doc["winner"]) if doc.get("winner") else None,
    )


# -- analyses ----------------------------------------------------------------------------------
# Shaped as protobuf's JSON printing gave them (int64 as strings, enums by full name, the fields
# without presence always there), which stored rows and webhook receivers already hold; only the
# verdicts are short (PASS, not VERDICT_PASS).


def _number(value: float) -> float | str:
    # As protobuf prints them: JSON has no NaN or infinities (and PostgreSQL refuses them).
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _proto_metric_json(m: MetricSpec) -> JsonObject:
    direction = f"{_DIRECTION_PREFIX}{m.direction.value if m.direction else 'UNSPECIFIED'}"
    out: JsonObject = {"name": m.name, "direction": direction}
    if m.tolerance is not None:
        out["tolerance"] = _number(m.tolerance)
    if m.relative is not None:
        out["relative"] = m.relative
    if m.fail_margin is not None:
        out["fail_margin"] = _number(m.fail_margin)
    return out


def _arm_json(a: ArmStats) -> JsonObject:
    return {"version": a.version, "sessions": str(a.sessions), "invocations": str(a.invocations),
            "estimate": _number(a.estimate), "ci_low": _number(a.ci_low),
            "ci_high": _number(a.ci_high)}


def _arm_from_json(d: Mapping[str, Json] | None) -> ArmStats | None:
    if d is None:
        return None
    return ArmStats(
        version=str(d.get("version", "")), sessions=int(d.get("sessions", 0)),
        invocations=int(d.get("invocations", 0)), estimate=float(d.get("estimate", 0.0)),
        ci_low=float(d.get("ci_low", 0.0)), ci_high=float(d.get("ci_high", 0.0)),
    )


def _verdict(value: Json) -> Verdict:
    short = str(value or "").removeprefix(_VERDICT_PREFIX)
    return Verdict(short) if short in Verdict.__members__ else Verdict.INCONCLUSIVE


def analysis_json(a: Analysis) -> JsonObject:
    comparisons = []
    for c in a.comparisons:
        doc: JsonObject = {"metric": _proto_metric_json(c.metric)}
        if c.baseline is not None:
            doc["baseline"] = _arm_json(c.baseline)
        if c.candidate is not None:
            doc["candidate"] = _arm_json(c.candidate)
        doc.update(difference=_number(c.difference), ci_low=_number(c.ci_low),
                   ci_high=_number(c.ci_high), tolerance=_number(c.tolerance),
                   verdict=c.verdict.value, explanation=c.explanation)
        comparisons.append(doc)
    out: JsonObject = {"comparisons": comparisons, "verdict": a.verdict.value}
    if a.evaluate_time is not None:
        out["evaluate_time"] = a.evaluate_time.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if a.error:
        out["error"] = a.error
    out.update(_non_default({"reason": a.reason, "missing_data": a.missing_data}))
    return out


def analysis_from_json(text: str) -> Analysis:
    doc: JsonObject = json.loads(text)
    stamp = doc.get("evaluate_time")
    return Analysis(
        verdict=_verdict(doc.get("verdict")),
        comparisons=tuple(
            Comparison(
                metric=_metric_from_json(c.get("metric", {})),
                baseline=_arm_from_json(c.get("baseline")),
                candidate=_arm_from_json(c.get("candidate")),
                difference=float(c.get("difference", 0.0)),
                ci_low=float(c.get("ci_low", 0.0)),
                ci_high=float(c.get("ci_high", 0.0)),
                tolerance=float(c.get("tolerance", 0.0)),
                verdict=_verdict(c.get("verdict")),
                explanation=str(c.get("explanation", "")),
            )
            for c in doc.get("comparisons", [])
        ),
        evaluate_time=datetime.fromisoformat(stamp) if stamp else None,
        error=str(doc.get("error", "")),
        reason=str(doc.get("reason", "")),
        missing_data=str(doc.get("missing_data", "")),
    )


def _non_default(doc: JsonObject) -> JsonObject:
    # Protobuf's JSON printing leaves out fields at their default value.
    return {k: v for k, v in doc.items() if v not in ("", 0, 0.0, False, [], {}, None)}


def experiment_analysis_json(a: ExperimentAnalysis) -> JsonObject:
    metrics = []
    for m in a.metrics:
        metric = _proto_metric_json(m.metric)
        if m.metric.direction is None:
            del metric["direction"]
        variants = [
            _non_default({
                "version": v.version, "sessions": str(v.sessions) if v.sessions else "",
                "estimate": _number(v.estimate), "ci_low": _number(v.ci_low),
                "ci_high": _number(v.ci_high), "control": v.control, "effect": _number(v.effect),
                "effect_low": _number(v.effect_low), "effect_high": _number(v.effect_high),
            })
            for v in m.variants
        ]
        metrics.append(_non_default({"metric": metric, "unit": m.unit, "variants": variants}))
    return _non_default({
        "metrics": metrics, "sessions": [str(n) for n in a.sessions],
        "sample_ratio_p_value": _number(a.sample_ratio_p_value),
        "sample_ratio_mismatch": a.sample_ratio_mismatch, "warning": a.warning, "error": a.error,
        "missing_data": a.missing_data,
    })
