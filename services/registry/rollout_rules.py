"""Input rules of rollouts and experiments, pure: steps, the metrics an analysis may watch (names
are checked here, at creation; the defaults for direction and tolerance belong to telemetry's
analysis, which applies them when a metric leaves them out), specs and their defaults."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime

from corral.names import EndpointRef, VersionRef
from services.common.endpoints import TrafficShare
from services.common.errors import InvalidArgument
from services.common.metric_spec import MetricSpec
from services.common.outbound import OutboundRefused, Target, parse_url
from services.registry.rollout_model import (
    AnalysisConfig,
    AnalysisGate,
    ExperimentRequest,
    ExperimentSpec,
    ManualGate,
    Pause,
    RolloutRequest,
    RolloutSpec,
    SessionPolicy,
    SetWeight,
    Step,
)
from services.registry.rules import normalize_split
from services.registry.strategies import DEFAULT_GATE_MAX_S, build_steps

KNOWN_METRICS = ("session_error_rate", "invocation_error_rate", "latency_p95", "latency_p99",
                 "tool_failure_rate", "tokens_per_session")
SCORE = re.compile(r"^score:[a-z][a-z0-9_.-]{0,62}$")
DEFAULT_METRICS = ("session_error_rate", "invocation_error_rate", "latency_p95")
DEFAULT_INTERVAL_S = 30
DEFAULT_MIN_SESSIONS = 100
DEFAULT_ALPHA = 0.05
DEFAULT_DRAIN_TIMEOUT_S = 3600
MAX_WEBHOOK_URL_CHARS = 2048
STEP_KINDS = "set_weight, pause, analysis, manual"


def validate_metrics(metrics: Sequence[MetricSpec]) -> tuple[MetricSpec, ...]:
    """Checks names and tolerances; keeps only what the user gave. Empty means the defaults."""
    if not metrics:
        return tuple(MetricSpec(n) for n in DEFAULT_METRICS)
    seen = set()
    for i, m in enumerate(metrics):
        field = f"metrics[{i}]"
        if m.name not in KNOWN_METRICS and not SCORE.match(m.name):
            raise InvalidArgument.field(
                f"{field}.name",
                f"{m.name!r} is not a metric: use one of {', '.join(KNOWN_METRICS)} or score:<name>",
            )
        if m.name in seen:
            raise InvalidArgument.field(f"{field}.name", f"{m.name} is listed twice")
        seen.add(m.name)
        if m.tolerance is not None and m.tolerance < 0:
            raise InvalidArgument.field(f"{field}.tolerance", f"{m.tolerance} must not be negative")
        if m.fail_margin is not None and m.fail_margin < 0:
            raise InvalidArgument.field(
                f"{field}.fail_margin", f"{m.fail_margin} must not be negative"
            )
    return tuple(metrics)


def missing_step_kind(index: int) -> InvalidArgument:
    """A step that is none of the kinds (an empty oneof)."""
    return InvalidArgument.field(f"rollout.steps[{index}]", f"must be exactly one of {STEP_KINDS}")


def validate_steps(steps: Sequence[Step]) -> tuple[Step, ...]:
    """Checks explicit steps: weights strictly increase, stay within (0, 100], and end at 100. An
    analysis gate without a maximum duration gets the default one."""
    if not steps:
        raise InvalidArgument.field("rollout.steps", "needs at least one step")
    last = 0.0
    out: list[Step] = []
    for i, step in enumerate(steps):
        field = f"rollout.steps[{i}]"
        match step:
            case SetWeight(percent=w):
                if not 0 < w <= 100:
                    raise InvalidArgument.field(f"{field}.set_weight", f"{w:g} must be > 0 and <= 100")
                if w <= last:
                    raise InvalidArgument.field(
                        f"{field}.set_weight", f"{w:g} does not increase on the previous weight {last:g}"
                    )
                last = w
            case Pause(seconds=s):
                if s <= 0:
                    raise InvalidArgument.field(f"{field}.pause", "must be a positive duration")
            case AnalysisGate(max_duration_s=s):
                if s == 0:
                    step = AnalysisGate(DEFAULT_GATE_MAX_S)
                elif s < 0:
                    raise InvalidArgument.field(
                        f"{field}.analysis.max_duration", "must be a positive duration"
                    )
            case ManualGate():
                pass
        out.append(step)
    if last != 100:
        raise InvalidArgument.field(
            "rollout.steps", f"must end at set_weight 100 (the last weight is {last:g})"
        )
    return tuple(out)


def check_candidate(endpoint: EndpointRef, candidate: VersionRef) -> None:
    if candidate.agent != endpoint.agent:
        raise InvalidArgument.field(
            "rollout.candidate_version",
            f"{candidate.name} is not a version of agents/{endpoint.agent}",
        )


def rollout_spec(request: RolloutRequest) -> RolloutSpec:
    """The spec a rollout runs by: the request checked, with the defaults filled in."""
    strategy = request.strategy or ("custom" if request.steps else "canary")
    steps = (
        validate_steps(request.steps) if request.steps else build_steps(strategy, DEFAULT_GATE_MAX_S)
    )
    analysis = AnalysisConfig(
        metrics=validate_metrics(request.metrics),
        interval_s=DEFAULT_INTERVAL_S if request.interval_s is None else request.interval_s,
        min_sessions=request.min_sessions or DEFAULT_MIN_SESSIONS,
        alpha=request.alpha or DEFAULT_ALPHA,
    )
    if analysis.interval_s <= 0:
        raise InvalidArgument.field("rollout.analysis.interval", "must be a positive duration")
    if analysis.min_sessions < 0:
        raise InvalidArgument.field("rollout.analysis.min_sessions", "must not be negative")
    if not 0 < analysis.alpha < 1:
        raise InvalidArgument.field("rollout.analysis.alpha", f"{analysis.alpha} must be in (0, 1)")
    return RolloutSpec(
        strategy=strategy,
        steps=steps,
        analysis=analysis,
        rollback_policy=request.rollback_policy or SessionPolicy.DRAIN,
        drain_timeout_s=int(request.drain_timeout_s or DEFAULT_DRAIN_TIMEOUT_S),
        webhook_url=check_webhook_url(request.webhook_url, "rollout.webhook_url"),
    )


def experiment_spec(
    endpoint: EndpointRef, request: ExperimentRequest, now: datetime
) -> tuple[ExperimentSpec, tuple[TrafficShare, ...]]:
    """The spec an experiment runs by, and the split it puts on the endpoint."""
    numbers: list[tuple[int, float]] = []
    for i, variant in enumerate(request.variants):
        if variant.version.agent != endpoint.agent:
            raise InvalidArgument.field(
                f"experiment.variants[{i}].version",
                f"{variant.version.name} is not a version of agents/{endpoint.agent}",
            )
        numbers.append((variant.version.number, variant.percent))
    if len(numbers) < 2:
        raise InvalidArgument.field(
            "experiment.variants", "needs a control and at least one variant, e.g. 2=80,3=20"
        )
    traffic = normalize_split(numbers)  # adds up to 100, no duplicates
    if request.end_time is not None and request.end_time <= now:
        raise InvalidArgument.field("experiment.end_time", "is in the past")
    if request.max_sessions < 0:
        raise InvalidArgument.field("experiment.max_sessions", "must not be negative")
    if request.alpha and not 0 < request.alpha < 1:
        raise InvalidArgument.field("experiment.alpha", f"{request.alpha} must be in (0, 1)")
    spec = ExperimentSpec(
        variants=tuple(TrafficShare(v, round(p * 100)) for v, p in numbers),
        metrics=validate_metrics(request.metrics),
        end_time=request.end_time,
        max_sessions=request.max_sessions,
        alpha=request.alpha or DEFAULT_ALPHA,
        webhook_url=check_webhook_url(request.webhook_url, "experiment.webhook_url"),
    )
    return spec, traffic


def webhook_target(url: str, field: str) -> Target:
    """Where a webhook URL points, as the outbound policy parses it."""
    try:
        return parse_url(url)
    except OutboundRefused as exc:
        raise InvalidArgument.field(field, str(exc), reason="DESTINATION_NOT_ALLOWED") from None


def check_webhook_url(url: str, field: str) -> str:
    if len(url) > MAX_WEBHOOK_URL_CHARS:
        raise InvalidArgument.field(field, f"must be at most {MAX_WEBHOOK_URL_CHARS} characters")
    if url:
        webhook_target(url, field)
    return url


def check_conclusion(winner: VersionRef | None, keep_control: bool) -> None:
    if (winner is not None) == keep_control:
        raise InvalidArgument.field("winner", "give exactly one of winner or keep_control")


def chosen_winner(spec: ExperimentSpec, name: str, winner: VersionRef | None) -> int:
    """The version an experiment concludes on: the named winner, or (None) the control."""
    if winner is None:
        return spec.control
    if winner.number not in [v.version for v in spec.variants]:
        raise InvalidArgument.field("winner", f"{winner.name} is not a variant of {name}")
    return winner.number
