"""A/B experiments: a fixed split between versions, each variant's metrics with always-valid
confidence intervals, each treatment's effect against control with an always-valid interval
(Bonferroni over the treatments, so all effect intervals hold at once), and the sample-ratio
check that decides whether a winner may be named at all. Experiments run to thousands of
sessions, so their boundary is tuned tighter there than a rollout's."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.telemetry.analysis.metrics import DEFAULT_METRICS, MetricSpec, measure, method_for
from services.telemetry.analysis.model import AnalysisConfig, SessionObservation
from services.telemetry.analysis.srm import SampleRatioCheck, sample_ratio_check


@dataclass(frozen=True)
class VariantSummary:
    """One variant on one metric. effect = variant − control (None for the control itself)."""

    variant: str
    sessions: int
    observations: float
    estimate: float
    lower: float
    upper: float
    effect: float | None = None
    effect_lower: float | None = None
    effect_upper: float | None = None
    details: Mapping[str, float] = field(default_factory=dict[str, float])


@dataclass(frozen=True)
class ExperimentMetric:
    """Every variant on one metric, the control first."""

    spec: MetricSpec
    variants: tuple[VariantSummary, ...]
    details: Mapping[str, float] = field(default_factory=dict[str, float])


@dataclass(frozen=True)
class ExperimentAnalysis:
    """Every metric across the variants, effects against `control`, at `alpha` over all of
    them; a winner may be named only when the sessions are split as configured."""

    control: str
    sample_ratio: SampleRatioCheck
    metrics: tuple[ExperimentMetric, ...]
    alpha: float
    # Spans of the window known to be missing (services/telemetry/gaps.py), for a human.
    missing_data: str = ""

    @property
    def winner_allowed(self) -> bool:
        return not self.sample_ratio.mismatch and not self.missing_data

    @property
    def warning(self) -> str:
        if self.missing_data:
            return f"missing data: {self.missing_data}; no winner can be named until it arrives"
        if self.winner_allowed:
            return ""
        return (
            f"sample ratio mismatch (chi-square p = {self.sample_ratio.p_value:.2g} < 0.001): "
            "sessions are not split as configured, so the effects cannot be trusted and no "
            "winner can be named; check routing and telemetry"
        )


EXPERIMENT_CONFIG = AnalysisConfig(mixing_sessions=1000.0)


def analyze_experiment(
    variants: Mapping[str, Sequence[SessionObservation]],
    split: Mapping[str, float],
    control: str,
    metrics: Sequence[MetricSpec] = DEFAULT_METRICS,
    config: AnalysisConfig | None = None,
) -> ExperimentAnalysis:
    """`variants` maps a variant (e.g. a version number) to its sessions in start order; `split`
    to its configured weight; `control` names the variant effects are measured against."""
    config = config or EXPERIMENT_CONFIG
    if control not in variants:
        raise ValueError(f"control {control!r} is not one of the variants {sorted(variants)}")
    srm = sample_ratio_check({k: len(v) for k, v in variants.items()}, split)
    treatments = [name for name in sorted(variants) if name != control]
    effect_config = dataclasses.replace(config, alpha=config.alpha / max(len(treatments), 1))
    reports = tuple(
        _metric(spec, variants, control, treatments, config, effect_config) for spec in metrics
    )
    return ExperimentAnalysis(control, srm, reports, config.alpha)


def _metric(
    spec: MetricSpec,
    variants: Mapping[str, Sequence[SessionObservation]],
    control: str,
    treatments: Sequence[str],
    config: AnalysisConfig,
    effect_config: AnalysisConfig,
) -> ExperimentMetric:
    mean_method = method_for(spec, config.alpha, config)
    effect_method = method_for(spec, effect_config.alpha, config)
    control_sessions = variants[control]
    details: dict[str, float] = {}
    summaries: list[VariantSummary] = []
    for name in [control, *treatments]:
        # Latency thresholds come from the control, so every variant is measured on one scale.
        m = measure(spec, variants[name], control_sessions)
        if "threshold_ms" in m.details:
            details = {"threshold_ms": m.details["threshold_ms"]}
        own = {  # e.g. this variant's p95 in milliseconds
            key.removeprefix("candidate_"): value
            for key, value in m.details.items()
            if key.startswith("candidate_")
        }
        mean = mean_method.mean(m.candidate)
        summary = VariantSummary(
            name, len(variants[name]), m.candidate.units, mean.estimate, mean.lower, mean.upper,
            details=own,
        )
        if name != control and m.candidate.units > 0 and m.baseline.units > 0:
            effect = effect_method.contrast(m.candidate, m.baseline, 1.0)
            summary = dataclasses.replace(
                summary,
                effect=float(effect.estimate),
                effect_lower=float(effect.lower),
                effect_upper=float(effect.upper),
            )
        summaries.append(summary)
    return ExperimentMetric(spec, tuple(summaries), details)
