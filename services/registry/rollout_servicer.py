"""RolloutService over gRPC: rollouts and experiments, from requests to parsed names and domain
values, one call into rollouts.py or experiments.py, records back to messages. Only conversion."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import duration_pb2, timestamp_pb2

from corral.names import EndpointRef, ExperimentRef, RolloutRef, VersionRef
from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import rollouts_pb2 as pb
from corral.registry.v1 import rollouts_pb2_grpc
from services.common.identity import caller
from services.common.interceptors import Context
from services.common.metric_protos import metric_from_pb, metric_pb
from services.common.timestamps import optional_time, timestamp
from services.registry import rollout_rules
from services.registry.analysis_protos import analysis_pb, experiment_analysis_pb
from services.registry.experiments import Experiments
from services.registry.messages import each, endpoint_pb, paging, traffic_targets
from services.registry.rollout_model import (
    AnalysisGate,
    ExperimentRecord,
    ExperimentRequest,
    ExperimentState,
    ManualGate,
    Pause,
    RolloutRecord,
    RolloutRequest,
    RolloutState,
    SessionPolicy,
    SetWeight,
    Step,
)
from services.registry.rollouts import Rollouts

# The values' names are the messages' enum names without their prefix.
_STATE_TO_PB = {s: pb.RolloutState.Value(f"ROLLOUT_STATE_{s.value}") for s in RolloutState}
_EXPERIMENT_STATE_TO_PB = {
    s: pb.ExperimentState.Value(f"EXPERIMENT_STATE_{s.value}") for s in ExperimentState
}
_POLICY_TO_PB = {p: pb.SessionPolicy.Value(f"SESSION_POLICY_{p.value}") for p in SessionPolicy}
_POLICY_FROM_PB = {v: k for k, v in _POLICY_TO_PB.items()}


def _seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def _duration(seconds: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(seconds))


def _ts(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
    return timestamp(dt) if dt is not None else None


def _endpoint(parent: str) -> EndpointRef:
    return EndpointRef.parse(parent, field="parent")


def step_from_pb(index: int, step: pb.RolloutStep) -> Step:
    kind = step.WhichOneof("kind")
    if kind == "set_weight":
        return SetWeight(step.set_weight)
    if kind == "pause":
        return Pause(_seconds(step.pause))
    if kind == "analysis":
        return AnalysisGate(_seconds(step.analysis.max_duration))
    if kind == "manual":
        return ManualGate()
    raise rollout_rules.missing_step_kind(index)


def step_pb(step: Step) -> pb.RolloutStep:
    match step:
        case SetWeight(percent=w):
            return pb.RolloutStep(set_weight=w)
        case Pause(seconds=s):
            return pb.RolloutStep(pause=_duration(s))
        case AnalysisGate(max_duration_s=s):
            return pb.RolloutStep(analysis=pb.AnalysisGate(max_duration=_duration(s)))
        case ManualGate():
            return pb.RolloutStep(manual=pb.ManualGate())


def rollout_request(r: pb.Rollout) -> RolloutRequest:
    return RolloutRequest(
        candidate=VersionRef.parse(r.candidate_version, field="rollout.candidate_version"),
        strategy=r.strategy,
        steps=tuple(step_from_pb(i, s) for i, s in enumerate(r.steps)),
        metrics=tuple(metric_from_pb(m) for m in r.analysis.metrics),
        interval_s=_seconds(r.analysis.interval) if r.analysis.HasField("interval") else None,
        min_sessions=r.analysis.min_sessions,
        alpha=r.analysis.alpha,
        rollback_policy=_POLICY_FROM_PB.get(r.rollback_policy),
        drain_timeout_s=_seconds(r.drain_timeout),
        webhook_url=r.webhook_url,
    )


def rollout_pb(r: RolloutRecord) -> pb.Rollout:
    spec = r.spec
    analysis = spec.analysis
    agent = r.endpoint.parent
    out = pb.Rollout(
        name=r.name,
        stable_version=agent.version(r.stable_version).name,
        candidate_version=agent.version(r.candidate_version).name,
        steps=[step_pb(s) for s in spec.steps],
        analysis=pb.AnalysisConfig(
            metrics=[metric_pb(m) for m in analysis.metrics],
            interval=_duration(analysis.interval_s),
            min_sessions=analysis.min_sessions, alpha=analysis.alpha,
        ),
        rollback_policy=_POLICY_TO_PB[spec.rollback_policy],
        drain_timeout=_duration(spec.drain_timeout_s),
        webhook_url=spec.webhook_url,
        state=_STATE_TO_PB[r.state], state_reason=r.state_reason, current_step=r.current_step,
        current_weight=r.current_weight, create_time=_ts(r.create_time), update_time=_ts(r.update_time),
        step_start_time=_ts(r.step_start_time), end_time=_ts(r.end_time), creator=r.creator,
        etag=r.etag, strategy=spec.strategy,
    )
    if r.last_analysis is not None:
        out.last_analysis.CopyFrom(analysis_pb(r.last_analysis))
    return out


def experiment_pb(r: ExperimentRecord) -> pb.Experiment:
    spec = r.spec
    agent = r.endpoint.parent
    return pb.Experiment(
        name=r.name,
        variants=[reg.TrafficTarget(version=agent.version(v.version).name, percent=v.percent)
                  for v in spec.variants],
        metrics=[metric_pb(m) for m in spec.metrics], max_sessions=spec.max_sessions,
        state=_EXPERIMENT_STATE_TO_PB[r.state],
        winner=agent.version(spec.winner).name if spec.winner else "",
        create_time=_ts(r.create_time), conclude_time=_ts(r.end_time), creator=r.creator,
        alpha=spec.alpha, webhook_url=spec.webhook_url, end_time=_ts(spec.end_time),
    )


def experiment_request(e: pb.Experiment) -> ExperimentRequest:
    return ExperimentRequest(
        variants=traffic_targets(e.variants, "experiment.variants"),
        metrics=tuple(metric_from_pb(m) for m in e.metrics),
        end_time=optional_time(e, "end_time"),
        max_sessions=e.max_sessions,
        alpha=e.alpha,
        webhook_url=e.webhook_url,
    )


class RolloutServicer(rollouts_pb2_grpc.RolloutServiceServicer):
    def __init__(self, rollouts: Rollouts, experiments: Experiments) -> None:
        self.rollouts = rollouts
        self.experiments = experiments

    # -- rollouts --------------------------------------------------------------------------

    async def CreateRollout(self, request: pb.CreateRolloutRequest, context: Context) -> pb.Rollout:
        wanted = rollout_request(request.rollout)
        record = await self.rollouts.create(caller(context), _endpoint(request.parent), wanted)
        return rollout_pb(record)

    async def ListRollouts(self, request: pb.ListRolloutsRequest, context: Context) -> pb.ListRolloutsResponse:
        page = await self.rollouts.list_rollouts(_endpoint(request.parent), paging(request, context))
        return pb.ListRolloutsResponse(rollouts=each(page, rollout_pb), next_page_token=page.next_page_token)

    async def GetRollout(self, request: pb.GetRolloutRequest, context: Context) -> pb.Rollout:
        return rollout_pb(await self.rollouts.get(caller(context), RolloutRef.parse(request.name)))

    async def PromoteRollout(self, request: pb.PromoteRolloutRequest, context: Context) -> pb.Rollout:
        record = await self.rollouts.promote(caller(context), RolloutRef.parse(request.name), request.full)
        return rollout_pb(record)

    async def PauseRollout(self, request: pb.PauseRolloutRequest, context: Context) -> pb.Rollout:
        record = await self.rollouts.pause(caller(context), RolloutRef.parse(request.name), request.reason)
        return rollout_pb(record)

    async def ResumeRollout(self, request: pb.ResumeRolloutRequest, context: Context) -> pb.Rollout:
        return rollout_pb(await self.rollouts.resume(caller(context), RolloutRef.parse(request.name)))

    async def AbortRollout(self, request: pb.AbortRolloutRequest, context: Context) -> pb.Rollout:
        record = await self.rollouts.abort(caller(context), RolloutRef.parse(request.name), request.reason)
        return rollout_pb(record)

    async def RollbackEndpoint(
        self, request: pb.RollbackEndpointRequest, context: Context
    ) -> reg.Endpoint:
        version = VersionRef.parse(request.version, field="version") if request.version else None
        record = await self.rollouts.rollback_endpoint(
            caller(context), EndpointRef.parse(request.name), version,
            _POLICY_FROM_PB.get(request.session_policy, SessionPolicy.DRAIN),
        )
        return endpoint_pb(record)

    # -- experiments -----------------------------------------------------------------------

    async def CreateExperiment(
        self, request: pb.CreateExperimentRequest, context: Context
    ) -> pb.Experiment:
        record = await self.experiments.create(
            caller(context), _endpoint(request.parent), experiment_request(request.experiment))
        return experiment_pb(record)

    async def GetExperiment(self, request: pb.GetExperimentRequest, context: Context) -> pb.Experiment:
        experiment = ExperimentRef.parse(request.name)
        return experiment_pb(await self.experiments.get(caller(context), experiment))

    async def ListExperiments(self, request: pb.ListExperimentsRequest, context: Context) -> pb.ListExperimentsResponse:
        page = await self.experiments.list_experiments(_endpoint(request.parent), paging(request, context))
        items = each(page, experiment_pb)
        return pb.ListExperimentsResponse(experiments=items, next_page_token=page.next_page_token)

    async def GetExperimentReport(
        self, request: pb.GetExperimentReportRequest, context: Context
    ) -> pb.ExperimentReport:
        report = await self.experiments.report(caller(context), ExperimentRef.parse(request.name))
        return pb.ExperimentReport(
            experiment=experiment_pb(report.experiment),
            analysis=experiment_analysis_pb(report.analysis),
            recommended_winner=report.recommended_winner, summary=report.summary,
        )

    async def ConcludeExperiment(
        self, request: pb.ConcludeExperimentRequest, context: Context
    ) -> pb.Experiment:
        winner = VersionRef.parse(request.winner, field="winner") if request.winner else None
        record = await self.experiments.conclude(
            caller(context), ExperimentRef.parse(request.name), winner, request.keep_control)
        return experiment_pb(record)
