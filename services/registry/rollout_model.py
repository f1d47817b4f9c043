"""Rollouts and experiments as values: their specs (steps, analysis thresholds, variants), their
records and states, and the analyses telemetry returns for them. No gRPC, no JSON here."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Generic, TypeVar

from corral.names import EndpointRef, ExperimentRef, RolloutRef, VersionRef
from services.common.endpoints import TrafficShare
from services.common.metric_spec import MetricSpec

# -- the strategy: steps ------------------------------------------------------------------------


@dataclass(frozen=True)
class SetWeight:
    """Sends `percent` of new sessions to the candidate."""

    percent: float


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class AnalysisGate:
    """Waits for the analysis to pass; after `max_duration_s` without a verdict, for a human."""

    max_duration_s: float


@dataclass(frozen=True)
class ManualGate:
    """Waits for a human to resume the rollout."""


Step = SetWeight | Pause | AnalysisGate | ManualGate


# -- specs: what the analysis watches (metrics: services.common.metric_spec), what a rollback does


class SessionPolicy(enum.Enum):
    """What happens to a rolled-back candidate's live sessions."""

    DRAIN = "DRAIN"  # nothing now; stopped after the drain timeout
    MIGRATE = "MIGRATE"  # re-pinned to the stable version at their next turn
    STOP = "STOP"


@dataclass(frozen=True)
class AnalysisConfig:
    metrics: tuple[MetricSpec, ...]
    interval_s: float
    min_sessions: int
    alpha: float


@dataclass(frozen=True)
class RolloutSpec:
    strategy: str
    steps: tuple[Step, ...]
    analysis: AnalysisConfig
    rollback_policy: SessionPolicy
    drain_timeout_s: int
    webhook_url: str
    # Set once the drain timeout passed and the candidate's remaining sessions were stopped.
    drained: bool = False


@dataclass(frozen=True)
class RolloutRequest:
    """A rollout as a caller asks for it: zero and None stand for the defaults."""

    candidate: VersionRef
    strategy: str = ""
    steps: tuple[Step, ...] = ()
    metrics: tuple[MetricSpec, ...] = ()
    interval_s: float | None = None
    min_sessions: int = 0
    alpha: float = 0.0
    rollback_policy: SessionPolicy | None = None
    drain_timeout_s: float = 0.0
    webhook_url: str = ""


@dataclass(frozen=True)
class ExperimentSpec:
    # In the caller's order: the control first.
    variants: tuple[TrafficShare, ...]
    metrics: tuple[MetricSpec, ...]
    end_time: datetime | None
    max_sessions: int
    alpha: float
    webhook_url: str
    winner: int | None = None

    @property
    def control(self) -> int:
        return self.variants[0].version


@dataclass(frozen=True)
class ExperimentRequest:
    variants: tuple[TrafficTarget, ...]
    metrics: tuple[MetricSpec, ...] = ()
    end_time: datetime | None = None
    max_sessions: int = 0
    alpha: float = 0.0
    webhook_url: str = ""


# -- analyses ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """One metric, candidate against baseline."""

    metric: MetricSpec
    baseline: ArmStats | None
    candidate: ArmStats | None
    difference: float
    ci_low: float
    ci_high: float
    tolerance: float
    verdict: Verdict
    explanation: str


@dataclass(frozen=True)
class ArmStats:
    version: str
    sessions: int
    invocations: int
    estimate: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Analysis:
    verdict: Verdict
    comparisons: tuple[Comparison, ...] = ()
    evaluate_time: datetime | None = None
    # Why there is no verdict from telemetry (it could not be asked), when that is the case.
    error: str = ""
    # Telemetry's why, and the spans of the window it knows are missing (never a PASS then).
    reason: str = ""
    missing_data: str = ""

    def failing(self) -> str:
        """What failed, for a human: each failing metric and telemetry's explanation."""
        parts = [
            f"{c.metric.name} {c.explanation}".strip()
            for c in self.comparisons
            if c.verdict is Verdict.FAIL
        ]
        return "; ".join(parts) or "the candidate is worse than the stable version"


@dataclass(frozen=True)
class VariantMetric:
    version: str
    sessions: int
    estimate: float
    ci_low: float
    ci_high: float
    control: bool
    effect: float
    effect_low: float
    effect_high: float


@dataclass(frozen=True)
class ExperimentMetric:
    metric: MetricSpec
    unit: str
    variants: tuple[VariantMetric, ...]


@dataclass(frozen=True)
class ExperimentAnalysis:
    metrics: tuple[ExperimentMetric, ...] = ()
    # Sessions per variant, in the experiment's order.
    sessions: tuple[int, ...] = ()
    sample_ratio_p_value: float = 0.0
    sample_ratio_mismatch: bool = False
    warning: str = ""
    # Why there is no analysis (telemetry could not be asked), when that is the case.
    error: str = ""
    # Spans of the window telemetry knows are missing: no winner while set.
    missing_data: str = ""


class Verdict(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"


Evidence = Analysis | ExperimentAnalysis


# -- records -------------------------------------------------------------------------------------


class RolloutState(enum.Enum):
    PROGRESSING = "PROGRESSING"
    PAUSED = "PAUSED"
    SUCCEEDED = "SUCCEEDED"
    ROLLED_BACK = "ROLLED_BACK"
    ABORTED = "ABORTED"


class ExperimentState(enum.Enum):
    RUNNING = "RUNNING"
    COMPLETE = "COMPLETE"  # reached its end; the split stays until someone concludes it
    CONCLUDED = "CONCLUDED"
    ABORTED = "ABORTED"


# At most one run per endpoint is in one of these (a unique index holds the store to it).
ACTIVE_STATES = ("PROGRESSING", "PAUSED", "RUNNING", "COMPLETE")


SpecT = TypeVar("SpecT", RolloutSpec, ExperimentSpec)
StateT = TypeVar("StateT", RolloutState, ExperimentState)


@dataclass(frozen=True)
class _Run(Generic[SpecT, StateT]):
    """What rollouts and experiments have in common: each changes one endpoint over time."""

    tenant: str
    endpoint: EndpointRef
    id: int
    spec: SpecT
    state: StateT
    state_reason: str
    traffic_start_time: datetime | None
    end_time: datetime | None
    create_time: datetime
    update_time: datetime
    creator: str
    revision: int

    kind: ClassVar[str]

    @property
    def agent(self) -> str:
        return self.endpoint.agent

    @property
    def ref(self) -> RolloutRef | ExperimentRef:
        raise NotImplementedError  # each kind has references of its own

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def active(self) -> bool:
        return self.state.value in ACTIVE_STATES

    @property
    def etag(self) -> str:
        return f'W/"{self.revision}"'


@dataclass(frozen=True)
class RolloutRecord(_Run[RolloutSpec, RolloutState]):
    stable_version: int
    candidate_version: int
    current_step: int
    current_weight: float
    last_analysis: Analysis | None
    last_check_time: datetime | None
    step_start_time: datetime

    kind: ClassVar[str] = "rollout"

    @property
    def ref(self) -> RolloutRef:
        return RolloutRef(self.endpoint, self.id)


@dataclass(frozen=True)
class ExperimentRecord(_Run[ExperimentSpec, ExperimentState]):
    kind: ClassVar[str] = "experiment"

    @property
    def ref(self) -> ExperimentRef:
        return ExperimentRef(self.endpoint, self.id)

    @property
    def stable_version(self) -> int:
        """The control."""
        return self.spec.control

    @property
    def candidate_version(self) -> int:
        """The first variant."""
        return self.spec.variants[1].version


RunRecord = RolloutRecord | ExperimentRecord


@dataclass(frozen=True)
class Transition:
    """A state change to announce (webhook, log) once its transaction has committed."""

    run: RunRecord
    event: str
    actor: str
    evidence: Evidence | None = None


Notify = Callable[[Transition], None]


@dataclass(frozen=True)
class ExperimentReport:
    experiment: ExperimentRecord
    analysis: ExperimentAnalysis
    recommended_winner: str
    summary: str


@dataclass(frozen=True)
class TrafficTarget:
    """One version's share of an endpoint, as a caller asked for it (a percent)."""

    version: VersionRef
    percent: float
