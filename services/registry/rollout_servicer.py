"""gRPC ↔ rollout domain."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format, timestamp_pb2

from corral import names
from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import rollouts_pb2 as pb
from corral.registry.v1 import rollouts_pb2_grpc
from corral.telemetry.v1 import telemetry_pb2 as tel
from services.common.identity import caller
from services.common.paging import paged
from services.common.timestamps import timestamp
from services.registry.experiments import Experiments
from services.registry.registry import Registry
from services.registry.rollout_store import RolloutRecord
from services.registry.rollouts import Rollouts
from services.registry.servicer import endpoint_pb

_STATE = {s: getattr(pb, f"ROLLOUT_STATE_{s}") for s in
          ("PROGRESSING", "PAUSED", "SUCCEEDED", "ROLLED_BACK", "ABORTED")}
_POLICY_TO_PB = {"DRAIN": pb.SESSION_POLICY_DRAIN, "MIGRATE": pb.SESSION_POLICY_MIGRATE, "STOP": pb.SESSION_POLICY_STOP}
_POLICY_FROM_PB = {v: k for k, v in _POLICY_TO_PB.items()}
_DIRECTION = {"LOWER_IS_BETTER": tel.METRIC_DIRECTION_LOWER_IS_BETTER,
              "HIGHER_IS_BETTER": tel.METRIC_DIRECTION_HIGHER_IS_BETTER}


def _ts(dt: Any) -> timestamp_pb2.Timestamp | None:
    return timestamp(dt) if dt is not None else None


def _secs(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def step_to_dict(step: pb.RolloutStep) -> dict[str, Any]:
    kind = step.WhichOneof("kind")
    if kind == "set_weight":
        return {"set_weight": step.set_weight}
    if kind == "pause":
        return {"pause_s": _secs(step.pause)}
    if kind == "analysis":
        return {"analysis": {"max_duration_s": _secs(step.analysis.max_duration) or 3600}}
    if kind == "manual":
        return {"manual": {}}
    return {}


def step_pb(step: dict[str, Any]) -> pb.RolloutStep:
    if "set_weight" in step:
        return pb.RolloutStep(set_weight=step["set_weight"])
    if "pause_s" in step:
        return pb.RolloutStep(pause=duration_pb2.Duration(seconds=int(step["pause_s"])))
    if "analysis" in step:
        return pb.RolloutStep(analysis=pb.AnalysisGate(
            max_duration=duration_pb2.Duration(seconds=int(step["analysis"]["max_duration_s"]))))
    return pb.RolloutStep(manual=pb.ManualGate())


def metric_to_dict(m: tel.MetricSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"name": m.name}
    if m.direction:
        d["direction"] = tel.MetricDirection.Name(m.direction).removeprefix("METRIC_DIRECTION_")
    if m.HasField("tolerance"):
        d["tolerance"] = m.tolerance
    if m.HasField("relative"):
        d["relative"] = m.relative
    if m.HasField("fail_margin"):
        d["fail_margin"] = m.fail_margin
    return d


def metric_pb(m: dict[str, Any]) -> tel.MetricSpec:
    out = tel.MetricSpec(name=m["name"], direction=_DIRECTION.get(m.get("direction", ""), 0))
    if "tolerance" in m:
        out.tolerance = m["tolerance"]
    if "relative" in m:
        out.relative = m["relative"]
    if "fail_margin" in m:
        out.fail_margin = m["fail_margin"]
    return out


def rollout_pb(r: RolloutRecord) -> pb.Rollout:
    spec = r.spec
    analysis = spec["analysis"]
    out = pb.Rollout(
        name=r.name,
        stable_version=names.version_name(r.agent, r.stable_version),
        candidate_version=names.version_name(r.agent, r.candidate_version),
        steps=[step_pb(s) for s in spec["steps"]],
        analysis=pb.AnalysisConfig(
            metrics=[metric_pb(m) for m in analysis["metrics"]],
            interval=duration_pb2.Duration(seconds=int(analysis["interval_s"])),
            min_sessions=int(analysis["min_sessions"]), alpha=float(analysis["alpha"]),
        ),
        rollback_policy=_POLICY_TO_PB[spec["rollback_policy"]],
        drain_timeout=duration_pb2.Duration(seconds=int(spec["drain_timeout_s"])),
        webhook_url=spec.get("webhook_url", ""),
        state=_STATE[r.state], state_reason=r.state_reason, current_step=r.current_step,
        current_weight=r.current_weight, create_time=_ts(r.create_time), update_time=_ts(r.update_time),
        step_start_time=_ts(r.step_start_time), end_time=_ts(r.end_time), creator=r.creator, etag=r.etag,
        strategy=spec.get("strategy", ""),
    )
    if r.last_analysis:
        json_format.ParseDict(_as_proto_json(r.last_analysis), out.last_analysis, ignore_unknown_fields=True)
    return out


def _as_proto_json(analysis: Any) -> dict[str, Any]:
    """The stored analysis uses short verdicts (PASS); the proto wants VERDICT_PASS."""
    def fix(d: dict[str, Any]) -> dict[str, Any]:
        d = dict(d)
        if "verdict" in d and not str(d["verdict"]).startswith("VERDICT_"):
            d["verdict"] = "VERDICT_" + str(d["verdict"])
        return d
    out = fix(analysis)
    out["comparisons"] = [fix(c) for c in analysis.get("comparisons", [])]
    return out


_EXPERIMENT_STATE = {"RUNNING": pb.EXPERIMENT_STATE_RUNNING, "COMPLETE": pb.EXPERIMENT_STATE_COMPLETE,
                     "CONCLUDED": pb.EXPERIMENT_STATE_CONCLUDED, "ABORTED": pb.EXPERIMENT_STATE_ABORTED}


def experiment_pb(r: RolloutRecord) -> pb.Experiment:
    spec = r.spec
    out = pb.Experiment(
        name=r.name,
        variants=[reg.TrafficTarget(version=names.version_name(r.agent, int(v)), percent=p)
                  for v, p in spec["variants"]],
        metrics=[metric_pb(m) for m in spec["metrics"]], max_sessions=int(spec.get("max_sessions") or 0),
        state=_EXPERIMENT_STATE.get(r.state, pb.EXPERIMENT_STATE_UNSPECIFIED),
        winner=names.version_name(r.agent, int(spec["winner"])) if spec.get("winner") else "",
        create_time=_ts(r.create_time), conclude_time=_ts(r.end_time), creator=r.creator,
        alpha=float(spec.get("alpha", 0.05)), webhook_url=spec.get("webhook_url", ""),
    )
    if spec.get("end_time"):
        out.end_time.FromDatetime(datetime.fromisoformat(spec["end_time"]))
    return out


def recommend(report: tel.AnalyzeExperimentResponse) -> tuple[str, str]:
    """(winner, summary): a variant whose effect is on the better side of zero on every metric,
    never when the sample ratio is off."""
    if report.sample_ratio_mismatch:
        return "", (f"sample ratio mismatch (p = {report.sample_ratio_p_value:.2g}): the split is not what was "
                    "configured; no winner can be named")
    better: dict[str, int] = {}
    for m in report.metrics:
        sign = 1 if m.metric.direction == tel.METRIC_DIRECTION_HIGHER_IS_BETTER else -1
        for v in m.variants:
            if v.control:
                continue
            wins = (v.effect_low > 0) if sign > 0 else (v.effect_high < 0)
            better[v.version] = better.get(v.version, 0) + (1 if wins else 0)
    winners = [v for v, n in better.items() if n == len(report.metrics) and n > 0]
    if len(winners) == 1:
        return winners[0], f"{winners[0]} beats the control on every metric"
    return "", "no variant beats the control on every metric yet"


class ExperimentServicer:
    """The experiment methods of RolloutService, mixed into RolloutServicer."""

    experiments: Experiments
    analyze_experiment: Any

    async def CreateExperiment(self, request: pb.CreateExperimentRequest, context: grpc.aio.ServicerContext) -> pb.Experiment:
        e = request.experiment
        end = e.end_time.ToDatetime(tzinfo=UTC) if e.HasField("end_time") else None
        record = await self.experiments.create(
            caller(context), request.parent, [(t.version, t.percent) for t in e.variants],
            [metric_to_dict(m) for m in e.metrics], end, e.max_sessions, e.alpha, e.webhook_url,
        )
        return experiment_pb(record)

    async def GetExperiment(self, request: pb.GetExperimentRequest, context: grpc.aio.ServicerContext) -> pb.Experiment:
        return experiment_pb(await self.experiments.get(request.name))

    async def ListExperiments(
        self, request: pb.ListExperimentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListExperimentsResponse:
        rows, token = await paged(request, lambda o, n: self.experiments.list(request.parent, o, n))
        return pb.ListExperimentsResponse(experiments=[experiment_pb(r) for r in rows], next_page_token=token)

    async def GetExperimentReport(
        self, request: pb.GetExperimentReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExperimentReport:
        record = await self.experiments.get(request.name)
        analysis = await self.analyze_experiment(record)
        winner, summary = recommend(analysis)
        return pb.ExperimentReport(experiment=experiment_pb(record), analysis=analysis,
                                   recommended_winner=winner, summary=summary)

    async def ConcludeExperiment(
        self, request: pb.ConcludeExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.Experiment:
        record = await self.experiments.get(request.name)
        evidence = None
        try:
            analysis = await self.analyze_experiment(record)
            evidence = json_format.MessageToDict(analysis, preserving_proto_field_name=True)
        except grpc.aio.AioRpcError:
            evidence = {"error": "telemetry unavailable when concluding"}
        updated = await self.experiments.conclude(caller(context), request.name, request.winner,
                                                  request.keep_control, evidence)
        return experiment_pb(updated)


class RolloutServicer(ExperimentServicer, rollouts_pb2_grpc.RolloutServiceServicer):
    def __init__(self, rollouts: Rollouts, registry: Registry, experiments: Any = None,
                 analyze_experiment: Any = None) -> None:
        self.rollouts = rollouts
        self.registry = registry
        self.experiments = experiments
        self.analyze_experiment = analyze_experiment

    async def CreateRollout(self, request: pb.CreateRolloutRequest, context: grpc.aio.ServicerContext) -> pb.Rollout:
        r = request.rollout
        spec: dict[str, Any] = {
            "strategy": r.strategy,
            "steps": [step_to_dict(s) for s in r.steps],
            "analysis": {"metrics": [metric_to_dict(m) for m in r.analysis.metrics]},
            "rollback_policy": _POLICY_FROM_PB.get(r.rollback_policy, ""),
            "drain_timeout_s": _secs(r.drain_timeout),
            "webhook_url": r.webhook_url,
        }
        if r.analysis.HasField("interval"):
            spec["analysis"]["interval_s"] = _secs(r.analysis.interval)
        if r.analysis.min_sessions:
            spec["analysis"]["min_sessions"] = r.analysis.min_sessions
        if r.analysis.alpha:
            spec["analysis"]["alpha"] = r.analysis.alpha
        record = await self.rollouts.create(caller(context), request.parent, r.candidate_version, spec)
        return rollout_pb(record)

    async def GetRollout(self, request: pb.GetRolloutRequest, context: grpc.aio.ServicerContext) -> pb.Rollout:
        return rollout_pb(await self.rollouts.get(request.name))

    async def ListRollouts(
        self, request: pb.ListRolloutsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRolloutsResponse:
        rows, token = await paged(request, lambda o, n: self.rollouts.list(request.parent, o, n))
        return pb.ListRolloutsResponse(rollouts=[rollout_pb(r) for r in rows], next_page_token=token)

    async def PromoteRollout(self, request: pb.PromoteRolloutRequest, context: grpc.aio.ServicerContext) -> pb.Rollout:
        return rollout_pb(await self.rollouts.promote(caller(context), request.name, request.full))

    async def PauseRollout(self, request: pb.PauseRolloutRequest, context: grpc.aio.ServicerContext) -> pb.Rollout:
        return rollout_pb(await self.rollouts.pause(caller(context), request.name, request.reason))

    async def ResumeRollout(self, request: pb.ResumeRolloutRequest, context: grpc.aio.ServicerContext) -> pb.Rollout:
        return rollout_pb(await self.rollouts.resume(caller(context), request.name))

    async def AbortRollout(self, request: pb.AbortRolloutRequest, context: grpc.aio.ServicerContext) -> pb.Rollout:
        return rollout_pb(await self.rollouts.abort(caller(context), request.name, request.reason))

    async def RollbackEndpoint(
        self, request: pb.RollbackEndpointRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        policy = _POLICY_FROM_PB.get(request.session_policy, "DRAIN")
        agent, endpoint, _ = await self.rollouts.rollback_endpoint(
            caller(context), request.name, request.version, policy)
        return endpoint_pb(await self.registry.get_endpoint(names.endpoint_name(agent, endpoint)))
