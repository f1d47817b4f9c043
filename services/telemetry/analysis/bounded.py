"""Confidence sequences for means of scores bounded in [0, 1], valid at every sample size without
any normal approximation: the predictable-plug-in empirical-Bernstein confidence sequence of
Waudby-Smith & Ramdas (2024), "Estimating means of bounded random variables by betting"
(JRSS-B 86(1)), computed exactly as confseq's predmix_empbern_twosided_cs with truncation 1/2 and
the running intersection. A contrast combines the two versions' sequences at alpha/2 each."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services.telemetry.analysis.boundary import AnyFloats, FloatArray, check_alpha
from services.telemetry.analysis.method import ArmSample, ContrastBounds, MeanBounds

TRUNCATION = 0.5


def empirical_bernstein_lower(values: AnyFloats, alpha: float) -> FloatArray:
    """One-sided lower confidence sequence at every prefix of `values` (each in [0, 1])."""
    t = np.arange(1, values.size + 1, dtype=np.float64)
    cum = np.cumsum(values)
    mean_prev = np.concatenate(([0.0], (cum / t)[:-1]))
    # The bets λ_t use a regularised mean and variance from the previous observations only
    # (prior mean 1/2, prior variance 1/4, one fake observation), so they are predictable.
    reg_mean = np.minimum((0.5 + cum) / (t + 1), 1.0)
    reg_var = (0.25 + np.cumsum(np.square(values - reg_mean))) / (t + 1)
    var_prev = np.concatenate(([0.25], reg_var[:-1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        bets = np.sqrt(2 * math.log(1 / alpha) / (t * np.log1p(t) * var_prev))
    bets = np.minimum(np.nan_to_num(bets, nan=0.0), TRUNCATION)
    psi = -np.log1p(-bets) - bets
    spent = np.cumsum(bets)
    margin = (math.log(1 / alpha) + np.cumsum(np.square(values - mean_prev) * psi)) / spent
    lower = np.maximum(np.cumsum(bets * values) / spent - margin, 0.0)
    return np.asarray(np.maximum.accumulate(lower), dtype=np.float64)


def bounded_mean_interval(values: AnyFloats, alpha: float) -> tuple[float, float]:
    """The two-sided (1 − alpha) confidence sequence for the mean, at the last observation."""
    if values.size == 0:
        return 0.0, 1.0
    if np.any((values < 0) | (values > 1)) or not np.all(np.isfinite(values)):
        raise ValueError("bounded scores must lie in [0, 1]")
    lower = empirical_bernstein_lower(values, alpha / 2)[-1]
    upper = 1 - empirical_bernstein_lower(1 - values, alpha / 2)[-1]
    return float(lower), float(upper)


@dataclass(frozen=True)
class BoundedMeanMethod:
    """For [0, 1] scores. The contrast's interval is exact (a union bound over the two versions'
    sequences), so it needs no pooled variance: there is no variance to collapse."""

    alpha: float = 0.05

    def __post_init__(self) -> None:
        check_alpha(self.alpha)

    def mean(self, arm: ArmSample) -> MeanBounds:
        lower, upper = bounded_mean_interval(arm.y, self.alpha)
        return MeanBounds(arm.estimate, lower, upper)

    def contrast(self, candidate: ArmSample, baseline: ArmSample, weight: float) -> ContrastBounds:
        if weight < 0:
            raise ValueError(f"weight must be non-negative, got {weight}")
        c_lo, c_hi = bounded_mean_interval(candidate.y, self.alpha / 2)
        b_lo, b_hi = bounded_mean_interval(baseline.y, self.alpha / 2)
        estimate = candidate.estimate - weight * baseline.estimate
        lower, upper = c_lo - weight * b_hi, c_hi - weight * b_lo
        return ContrastBounds(estimate, lower, upper, lower, upper)
