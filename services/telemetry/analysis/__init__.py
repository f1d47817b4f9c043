"""Always-valid statistics for rollout analysis and A/B experiments: confidence sequences that may
be looked at after every interval without inflating false rollbacks. Pure Python over numpy and
scipy (no grpc, no database), so any service can import it.

    analyze_rollout(baseline_sessions, candidate_sessions, metrics, config) -> RolloutAnalysis
    analyze_experiment(variant_sessions, split, control, metrics, config) -> ExperimentAnalysis

One module per method behind SequentialMethod: normal_mixture (delta method, pooled variance),
bounded (empirical-Bernstein for [0, 1] scores); srm for the sample-ratio check."""

from services.telemetry.analysis.bounded import BoundedMeanMethod
from services.telemetry.analysis.experiment import (
    EXPERIMENT_CONFIG,
    ExperimentAnalysis,
    ExperimentMetric,
    VariantSummary,
    analyze_experiment,
)
from services.telemetry.analysis.method import (
    ArmSample,
    ContrastBounds,
    MeanBounds,
    SequentialMethod,
)
from services.telemetry.analysis.metrics import (
    DEFAULT_METRICS,
    DEFAULT_SCORE_TOLERANCE,
    DEFAULT_TOLERANCES,
    SCORE_PREFIX,
    MetricSpec,
    check_metric_name,
    metric,
)
from services.telemetry.analysis.model import (
    AnalysisConfig,
    Direction,
    SessionObservation,
    Threshold,
    Verdict,
)
from services.telemetry.analysis.normal_mixture import Moments, NormalMixtureMethod
from services.telemetry.analysis.rollout import (
    ArmEvidence,
    MetricComparison,
    RolloutAnalysis,
    analyze_rollout,
)
from services.telemetry.analysis.srm import SRM_P_VALUE, SampleRatioCheck, sample_ratio_check

__all__ = [
    "DEFAULT_METRICS",
    "DEFAULT_SCORE_TOLERANCE",
    "DEFAULT_TOLERANCES",
    "EXPERIMENT_CONFIG",
    "SCORE_PREFIX",
    "SRM_P_VALUE",
    "AnalysisConfig",
    "ArmEvidence",
    "ArmSample",
    "BoundedMeanMethod",
    "ContrastBounds",
    "Direction",
    "ExperimentAnalysis",
    "ExperimentMetric",
    "MeanBounds",
    "MetricComparison",
    "MetricSpec",
    "Moments",
    "NormalMixtureMethod",
    "RolloutAnalysis",
    "SampleRatioCheck",
    "SequentialMethod",
    "SessionObservation",
    "Threshold",
    "VariantSummary",
    "Verdict",
    "analyze_experiment",
    "analyze_rollout",
    "check_metric_name",
    "metric",
    "sample_ratio_check",
]
