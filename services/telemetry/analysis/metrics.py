"""The metrics a rollout or experiment compares, their default directions and tolerances, and how
each turns a version's sessions into per-session (y, x) pairs with the session as the unit.

Latency quantiles are compared through a proportion, not a difference of quantiles: the share of
the candidate's invocations slower than the baseline's p95 (or p99), against the baseline's own
share (5% or 1%). A candidate whose p95 is no worse has about 5% of invocations above that
latency; a tolerance of 0.05 lets it have up to 10%, i.e. its p90 may reach the baseline's p95.
Being a ratio of per-session counts, it gets a confidence sequence like any other ratio."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from services.telemetry.analysis.bounded import BoundedMeanMethod
from services.telemetry.analysis.method import ArmSample, SequentialMethod
from services.telemetry.analysis.model import (
    AnalysisConfig,
    Direction,
    SessionObservation,
    Threshold,
)
from services.telemetry.analysis.normal_mixture import NormalMixtureMethod

SESSION_ERROR_RATE = "session_error_rate"
INVOCATION_ERROR_RATE = "invocation_error_rate"
LATENCY_P95 = "latency_p95"
LATENCY_P99 = "latency_p99"
TOOL_FAILURE_RATE = "tool_failure_rate"
TOKENS_PER_SESSION = "tokens_per_session"
SCORE_PREFIX = "score:"

_QUANTILES = {LATENCY_P95: 0.95, LATENCY_P99: 0.99}
_UNITS = {
    SESSION_ERROR_RATE: "share of sessions with a failure",
    INVOCATION_ERROR_RATE: "share of invocations that failed",
    LATENCY_P95: "share of invocations slower than the baseline's p95",
    LATENCY_P99: "share of invocations slower than the baseline's p99",
    TOOL_FAILURE_RATE: "share of tool calls that failed",
    TOKENS_PER_SESSION: "tokens per session",
}
_OBSERVED = {
    SESSION_ERROR_RATE: "sessions",
    INVOCATION_ERROR_RATE: "invocations",
    LATENCY_P95: "invocation latencies",
    LATENCY_P99: "invocation latencies",
    TOOL_FAILURE_RATE: "tool calls",
    TOKENS_PER_SESSION: "token counts",
}
# Chosen with bench/rollouts_sim.py: an identical candidate passes every default metric within a
# few hundred candidate sessions (2% session errors, 1 + Poisson(2) invocations per session).
DEFAULT_TOLERANCES: Mapping[str, Threshold] = MappingProxyType(
    {
        SESSION_ERROR_RATE: Threshold(0.03),
        INVOCATION_ERROR_RATE: Threshold(0.03),
        LATENCY_P95: Threshold(0.05),
        LATENCY_P99: Threshold(0.02),
        TOOL_FAILURE_RATE: Threshold(0.05),
        TOKENS_PER_SESSION: Threshold(0.25, relative=True),
    }
)
DEFAULT_SCORE_TOLERANCE = Threshold(0.05)
NO_MARGIN = Threshold(0.0)
# Only the session error rate fails on any established degradation by default; the others fail
# beyond their tolerance, so an identical candidate's false-rollback risk is spent on one metric.
DEFAULT_FAIL_MARGINS: Mapping[str, Threshold] = MappingProxyType({SESSION_ERROR_RATE: NO_MARGIN})


@dataclass(frozen=True)
class MetricSpec:
    """A metric to compare. The candidate passes on it when shown to be worse by less than
    `tolerance`, and fails when shown to be worse by more than `fail_margin` — the tolerance
    itself when None. A zero fail margin fails any degradation the evidence establishes (the
    default for session_error_rate: it is what makes a bad candidate roll back quickly)."""

    name: str
    direction: Direction
    tolerance: Threshold
    fail_margin: Threshold | None = None

    def __post_init__(self) -> None:
        check_metric_name(self.name)
        higher = self.direction is Direction.HIGHER_IS_BETTER
        for threshold in (self.tolerance, self.margin):
            if higher and threshold.relative and threshold.value >= 1:
                raise ValueError(
                    f"metric {self.name}: a relative threshold on a higher-is-better metric "
                    f"must be below 1 (100% of the baseline), got {threshold.value}"
                )
        margin = self.margin
        if margin.relative == self.tolerance.relative and margin.value > self.tolerance.value:
            raise ValueError(
                f"metric {self.name}: fail_margin {margin.value} exceeds tolerance "
                f"{self.tolerance.value}; a candidate between them could never be decided"
            )

    @property
    def margin(self) -> Threshold:
        """The fail margin in effect."""
        return self.tolerance if self.fail_margin is None else self.fail_margin

    @property
    def tests_equality(self) -> bool:
        """Fails on any established degradation: an identical candidate sits on its null."""
        return self.margin.value == 0

    @property
    def is_score(self) -> bool:
        return self.name.startswith(SCORE_PREFIX)

    @property
    def unit(self) -> str:
        return "mean score" if self.is_score else _UNITS[self.name]

    @property
    def observed(self) -> str:
        """What the metric's denominator counts, for messages."""
        return f"{self.name} values" if self.is_score else _OBSERVED[self.name]


def method_for(spec: MetricSpec, alpha: float, config: AnalysisConfig) -> SequentialMethod:
    """The method that bounds `spec` at `alpha`: empirical-Bernstein for [0, 1] scores, the
    normal mixture (tuned by config.mixing_sessions) for every other metric."""
    if spec.is_score:
        return BoundedMeanMethod(alpha)
    return NormalMixtureMethod(alpha, config.mixing_sessions)


def check_metric_name(name: str) -> None:
    if name in _UNITS:
        return
    if name.startswith(SCORE_PREFIX) and name[len(SCORE_PREFIX):].strip():
        return
    known = ", ".join([*_UNITS, "score:<name>"])
    raise ValueError(f"unknown metric {name!r}; use one of {known}")


def metric(
    name: str,
    *,
    tolerance: Threshold | float | None = None,
    direction: Direction | None = None,
    fail_margin: Threshold | float | None = None,
) -> MetricSpec:
    """A MetricSpec with the metric's default direction, tolerance and fail margin where not
    given (numbers are absolute thresholds)."""
    check_metric_name(name)
    is_score = name.startswith(SCORE_PREFIX)
    if direction is None:
        direction = Direction.HIGHER_IS_BETTER if is_score else Direction.LOWER_IS_BETTER
    if tolerance is None:
        tolerance = DEFAULT_SCORE_TOLERANCE if is_score else DEFAULT_TOLERANCES[name]
    if not isinstance(tolerance, Threshold):
        tolerance = Threshold(float(tolerance))
    if fail_margin is None:
        fail_margin = DEFAULT_FAIL_MARGINS.get(name)
    elif not isinstance(fail_margin, Threshold):
        fail_margin = Threshold(float(fail_margin))
    return MetricSpec(name, direction, tolerance, fail_margin)


DEFAULT_METRICS: tuple[MetricSpec, ...] = tuple(metric(name) for name in DEFAULT_TOLERANCES)


@dataclass(frozen=True)
class Measurement:
    """A metric's per-session samples for both versions, plus descriptive figures (e.g. the
    quantiles in milliseconds behind a latency comparison)."""

    candidate: ArmSample
    baseline: ArmSample
    details: Mapping[str, float] = field(default_factory=dict[str, float])


def observed_count(spec: MetricSpec, arm: ArmSample) -> float:
    """How many observations the metric has in a version: sessions that report tokens (a session
    without gen_ai.usage attributes reports none), or else the metric's denominator."""
    if spec.name == TOKENS_PER_SESSION:
        return float(np.count_nonzero(arm.y))
    return arm.units


def measure(
    spec: MetricSpec,
    candidate: Sequence[SessionObservation],
    baseline: Sequence[SessionObservation],
) -> Measurement:
    if spec.is_score:
        key = spec.name[len(SCORE_PREFIX):]
        return Measurement(_scores(candidate, key), _scores(baseline, key))
    if spec.name in _QUANTILES:
        return _latency(spec.name, _QUANTILES[spec.name], candidate, baseline)
    return Measurement(_counts(spec.name, candidate), _counts(spec.name, baseline))


def _counts(name: str, sessions: Sequence[SessionObservation]) -> ArmSample:
    if name == SESSION_ERROR_RATE:
        return ArmSample.of([float(s.had_failure) for s in sessions], binary=True)
    if name == INVOCATION_ERROR_RATE:
        y = [float(s.failed_invocations) for s in sessions]
        return ArmSample.of(y, [float(s.invocations) for s in sessions], binary=True)
    if name == TOOL_FAILURE_RATE:
        y = [float(s.tool_failures) for s in sessions]
        return ArmSample.of(y, [float(s.tool_calls) for s in sessions], binary=True)
    return ArmSample.of([float(s.tokens) for s in sessions])


def _scores(sessions: Sequence[SessionObservation], key: str) -> ArmSample:
    return ArmSample.of([s.scores[key] for s in sessions if key in s.scores])


def _latency(
    name: str,
    q: float,
    candidate: Sequence[SessionObservation],
    baseline: Sequence[SessionObservation],
) -> Measurement:
    base_values, base_owner = _flatten_latencies(baseline)
    cand_values, cand_owner = _flatten_latencies(candidate)
    if base_values.size == 0:  # no threshold to compare against: both versions count as no data
        return Measurement(
            _exceeding(cand_values, cand_owner, len(candidate), math.inf),
            _exceeding(base_values, base_owner, len(baseline), math.inf),
        )
    threshold = float(np.quantile(base_values, q))
    label = name.removeprefix("latency_")
    details = {"threshold_ms": threshold, f"baseline_{label}_ms": threshold}
    if cand_values.size:
        details[f"candidate_{label}_ms"] = float(np.quantile(cand_values, q))
    return Measurement(
        _exceeding(cand_values, cand_owner, len(candidate), threshold),
        _exceeding(base_values, base_owner, len(baseline), threshold),
        details,
    )


def _flatten_latencies(
    sessions: Sequence[SessionObservation],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """All invocation latencies in one array, with the index of the session each belongs to."""
    counts = np.fromiter((len(s.latencies_ms) for s in sessions), np.int64, len(sessions))
    values = np.fromiter(
        itertools.chain.from_iterable(s.latencies_ms for s in sessions), np.float64, counts.sum()
    )
    return values, np.repeat(np.arange(len(sessions), dtype=np.int64), counts)


def _exceeding(
    values: npt.NDArray[np.float64],
    owner: npt.NDArray[np.int64],
    sessions: int,
    threshold: float,
) -> ArmSample:
    """Per session: invocations slower than the threshold (y) among its invocations (x); with
    an infinite threshold (nothing to compare with) every session counts as having none."""
    x = np.bincount(owner, minlength=sessions).astype(np.float64)
    if math.isinf(threshold):
        x = np.zeros(sessions)
    y = np.bincount(owner, weights=(values > threshold).astype(np.float64), minlength=sessions)
    return ArmSample(y.astype(np.float64), x, binary=True)
