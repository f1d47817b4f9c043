"""Rollout analysis: the candidate against the stable version serving in the same window, metric
by metric, with always-valid intervals, so it may be re-run at every interval.

Per metric, with D the candidate's degradation (candidate − baseline, negated when higher is
better): FAIL when the confidence sequence puts D above the fail margin, after min_fail_sessions
per version; PASS when it puts D below the tolerance and both versions have min_sessions;
otherwise INCONCLUSIVE; FAIL wins over PASS. A zero fail margin tests "both versions are the
same", so its bound uses the pooled variance that hypothesis implies — it cannot collapse when a
version has no errors yet; every other bound uses each version's own variance, which is the one
that holds at a non-zero threshold. alpha is split evenly over the zero-margin metrics, which
are the ones an identical candidate could falsely fail. Overall: FAIL if any metric fails, PASS
if all pass, else INCONCLUSIVE."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from services.telemetry.analysis.boundary import ArrayLike
from services.telemetry.analysis.method import ArmSample, ContrastBounds
from services.telemetry.analysis.metrics import (
    DEFAULT_METRICS,
    MetricSpec,
    measure,
    method_for,
    observed_count,
)
from services.telemetry.analysis.model import (
    AnalysisConfig,
    Direction,
    SessionObservation,
    Threshold,
    Verdict,
)
from services.telemetry.analysis.normal_mixture import Moments, NormalMixtureMethod

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class ArmEvidence:
    sessions: int
    invocations: int
    observations: float  # the metric's denominator: sessions, invocations, tool calls, scores
    estimate: float


@dataclass(frozen=True)
class MetricComparison:
    """The evidence behind one metric's verdict. difference = candidate − baseline. [lower,
    upper] is its always-valid interval: the bound on the worse side is the one the FAIL test
    reads (at fail_alpha), the other the one the PASS test reads (at alpha). tolerance and
    fail_margin are absolute amounts of degradation in the metric's unit (relative thresholds
    resolved against the baseline's estimate)."""

    spec: MetricSpec
    baseline: ArmEvidence
    candidate: ArmEvidence
    difference: float
    lower: float
    upper: float
    tolerance: float
    fail_margin: float
    fail_alpha: float
    verdict: Verdict
    reason: str
    details: Mapping[str, float] = field(default_factory=dict[str, float])

    @property
    def metric(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class RolloutAnalysis:
    """The candidate against the stable version: FAIL if any metric fails, PASS if every one
    passes, else INCONCLUSIVE; why, each metric's comparison, and the alpha they held to."""

    verdict: Verdict
    reason: str
    comparisons: tuple[MetricComparison, ...]
    alpha: float
    # Spans of the window known to be missing (services/telemetry/gaps.py), for a human.
    missing_data: str = ""


@dataclass(frozen=True, eq=False)
class Judgement:
    """Verdict masks and the interval on the difference scale (arrays for simulated looks)."""

    failed: BoolArray
    passed: BoolArray
    lower: ArrayLike
    upper: ArrayLike
    fail_margin: ArrayLike
    tolerance: ArrayLike


def contrast_weight(threshold: Threshold, direction: Direction) -> float:
    """θ = candidate − w·baseline turns a relative threshold r into a test of θ against 0:
    D > r·baseline ⇔ sign·(candidate − (1 + sign·r)·baseline) > 0."""
    return 1.0 + direction.sign * threshold.value if threshold.relative else 1.0


def fail_alpha(spec: MetricSpec, metrics: Sequence[MetricSpec], alpha: float) -> float:
    """Bonferroni over the metrics an identical candidate sits on the null of."""
    if not spec.tests_equality:
        return alpha
    return alpha / max(1, sum(m.tests_equality for m in metrics))


def judge(
    spec: MetricSpec,
    fail_bounds: ContrastBounds,
    pass_bounds: ContrastBounds,
    baseline_estimate: ArrayLike,
    candidate_sessions: ArrayLike,
    baseline_sessions: ArrayLike,
    config: AnalysisConfig,
) -> Judgement:
    """fail_bounds/pass_bounds are for θ with contrast_weight(spec.margin) and
    contrast_weight(spec.tolerance). Works elementwise on arrays."""
    s = spec.direction.sign
    margin = spec.margin
    f_lo, f_hi = (
        (fail_bounds.null_lower, fail_bounds.null_upper)
        if spec.tests_equality
        else (fail_bounds.lower, fail_bounds.upper)
    )
    # Degradation bounds, shifted so a relative threshold reads as an absolute one: D − r·base.
    base = np.asarray(baseline_estimate, dtype=np.float64)
    f_shift = margin.value * base if margin.relative else np.float64(0.0)
    p_shift = spec.tolerance.value * base if spec.tolerance.relative else np.float64(0.0)
    degradation_low = (np.asarray(f_lo) if s > 0 else -np.asarray(f_hi)) + f_shift
    degradation_high = (
        np.asarray(pass_bounds.upper) if s > 0 else -np.asarray(pass_bounds.lower)
    ) + p_shift
    fail_margin = f_shift if margin.relative else np.float64(margin.value)
    tolerance = p_shift if spec.tolerance.relative else np.float64(spec.tolerance.value)
    n_c, n_b = np.asarray(candidate_sessions), np.asarray(baseline_sessions)
    with np.errstate(invalid="ignore"):
        failed = (
            (degradation_low > fail_margin)
            & (n_c >= config.min_fail_sessions)
            & (n_b >= config.min_fail_sessions)
        )
        passed = (
            (degradation_high < tolerance)
            & (n_c >= config.min_sessions)
            & (n_b >= config.min_sessions)
            & ~failed
        )
    lower, upper = (
        (degradation_low, degradation_high) if s > 0 else (-degradation_high, -degradation_low)
    )
    return Judgement(failed, passed, lower, upper, fail_margin, tolerance)


def judge_moments(
    spec: MetricSpec,
    candidate: Moments,
    baseline: Moments,
    config: AnalysisConfig,
    *,
    binary: bool,
    alpha_for_fail: float | None = None,
) -> Judgement:
    """The normal-mixture path from sufficient statistics: what analyze_rollout runs for every
    non-score metric, exposed so simulations can judge thousands of looks in one call."""
    fail_method = NormalMixtureMethod(alpha_for_fail or config.alpha, config.mixing_sessions)
    pass_method = NormalMixtureMethod(config.alpha, config.mixing_sessions)
    fail_bounds = fail_method.contrast_moments(
        candidate, baseline, contrast_weight(spec.margin, spec.direction), binary
    )
    pass_bounds = pass_method.contrast_moments(
        candidate, baseline, contrast_weight(spec.tolerance, spec.direction), binary
    )
    return judge(
        spec, fail_bounds, pass_bounds, baseline.ratio(), candidate.n, baseline.n, config
    )


def analyze_rollout(
    baseline: Sequence[SessionObservation],
    candidate: Sequence[SessionObservation],
    metrics: Sequence[MetricSpec] = DEFAULT_METRICS,
    config: AnalysisConfig | None = None,
) -> RolloutAnalysis:
    """Compare the candidate's sessions with the baseline's from the same window."""
    config = config or AnalysisConfig()
    if not metrics:
        raise ValueError("a rollout analysis needs at least one metric")
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        raise ValueError(f"metrics are listed more than once: {sorted(names)}")
    sizes = (
        (len(candidate), sum(s.invocations for s in candidate)),
        (len(baseline), sum(s.invocations for s in baseline)),
    )
    comparisons = tuple(
        _compare(spec, baseline, candidate, sizes, config, fail_alpha(spec, metrics, config.alpha))
        for spec in metrics
    )
    verdict, reason = _overall(comparisons)
    return RolloutAnalysis(verdict, reason, comparisons, config.alpha)


def _compare(
    spec: MetricSpec,
    baseline: Sequence[SessionObservation],
    candidate: Sequence[SessionObservation],
    sizes: tuple[tuple[int, int], tuple[int, int]],
    config: AnalysisConfig,
    alpha_for_fail: float,
) -> MetricComparison:
    m = measure(spec, candidate, baseline)
    c_arm = _evidence(spec, sizes[0], m.candidate)
    b_arm = _evidence(spec, sizes[1], m.baseline)

    def result(verdict: Verdict, reason: str, j: Judgement | None = None) -> MetricComparison:
        nan = float("nan")
        return MetricComparison(
            spec, b_arm, c_arm, c_arm.estimate - b_arm.estimate,
            float(j.lower) if j else nan,
            float(j.upper) if j else nan,
            float(j.tolerance) if j else spec.tolerance.absolute(b_arm.estimate),
            float(j.fail_margin) if j else spec.margin.absolute(b_arm.estimate),
            alpha_for_fail, verdict, reason, dict(m.details),
        )

    enough = min(c_arm.sessions, b_arm.sessions) >= config.min_sessions
    if c_arm.observations == 0 and b_arm.observations == 0:
        if spec.is_score:
            return result(Verdict.INCONCLUSIVE, f"no {spec.observed} recorded yet")
        if enough:
            return result(Verdict.PASS, f"nothing to compare: no {spec.observed} in either version")
        return result(Verdict.INCONCLUSIVE, _too_few(c_arm, b_arm, config))
    for arm, who in ((c_arm, "candidate"), (b_arm, "stable version")):
        if arm.observations == 0:
            return result(Verdict.INCONCLUSIVE, f"no {spec.observed} for the {who} yet")

    fail_bounds = method_for(spec, alpha_for_fail, config).contrast(
        m.candidate, m.baseline, contrast_weight(spec.margin, spec.direction)
    )
    pass_bounds = method_for(spec, config.alpha, config).contrast(
        m.candidate, m.baseline, contrast_weight(spec.tolerance, spec.direction)
    )
    j = judge(
        spec, fail_bounds, pass_bounds, b_arm.estimate, c_arm.sessions, b_arm.sessions, config
    )
    interval = f"[{float(j.lower):.4g}, {float(j.upper):.4g}]"
    if bool(j.failed):
        return result(
            Verdict.FAIL,
            f"candidate worse than the stable version by more than the fail margin "
            f"{float(j.fail_margin):.4g}: candidate − stable is in {interval} "
            f"({spec.direction.value})",
            j,
        )
    if bool(j.passed):
        return result(
            Verdict.PASS,
            f"candidate no worse than the tolerance {float(j.tolerance):.4g}: "
            f"candidate − stable is in {interval}",
            j,
        )
    if not enough:
        return result(Verdict.INCONCLUSIVE, _too_few(c_arm, b_arm, config), j)
    return result(
        Verdict.INCONCLUSIVE,
        f"not enough evidence yet: candidate − stable is in {interval}, tolerance "
        f"{float(j.tolerance):.4g}",
        j,
    )


def _evidence(spec: MetricSpec, size: tuple[int, int], arm: ArmSample) -> ArmEvidence:
    return ArmEvidence(
        sessions=size[0],
        invocations=size[1],
        observations=observed_count(spec, arm),
        estimate=arm.estimate,
    )


def _too_few(c: ArmEvidence, b: ArmEvidence, config: AnalysisConfig) -> str:
    return (
        f"a pass needs {config.min_sessions} sessions per version "
        f"(candidate {c.sessions}, stable {b.sessions})"
    )


def _overall(comparisons: Sequence[MetricComparison]) -> tuple[Verdict, str]:
    failed = [c.metric for c in comparisons if c.verdict is Verdict.FAIL]
    if failed:
        return Verdict.FAIL, "candidate worse than the stable version on " + ", ".join(failed)
    waiting = [c.metric for c in comparisons if c.verdict is Verdict.INCONCLUSIVE]
    if waiting:
        return Verdict.INCONCLUSIVE, "not yet conclusive on " + ", ".join(waiting)
    return Verdict.PASS, "candidate no worse than the stable version on every metric"
