"""Asymptotic normal-mixture confidence sequences (Howard et al. 2021's boundary applied to the
standardised estimate, as in Waudby-Smith et al. 2024's asymptotic confidence sequences) for
means, proportions and ratios of sums with the session as the unit: the delta method gives each
version's variance from per-session pairs (y, x), so invocations of one session are never treated
as independent. Everything works on sufficient statistics, so one call can evaluate thousands of
simulated looks at once."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services.telemetry.analysis.boundary import (
    ArrayLike,
    FloatArray,
    check_alpha,
    z_multiplier,
)
from services.telemetry.analysis.method import ArmSample, ContrastBounds, MeanBounds


@dataclass(frozen=True, eq=False)
class Moments:
    """Sums over sessions of 1, x, y, x², xy, y² — all the delta method needs. Fields may be
    numpy arrays (one entry per simulated look) as long as they broadcast together."""

    n: ArrayLike
    sx: ArrayLike
    sy: ArrayLike
    sxx: ArrayLike
    sxy: ArrayLike
    syy: ArrayLike

    @classmethod
    def of(cls, arm: ArmSample) -> Moments:
        y, x = arm.y, arm.x
        return cls(
            float(y.size),
            float(x.sum()),
            float(y.sum()),
            float(x @ x),
            float(x @ y),
            float(y @ y),
        )

    def __add__(self, other: Moments) -> Moments:
        return Moments(
            np.add(self.n, other.n),
            np.add(self.sx, other.sx),
            np.add(self.sy, other.sy),
            np.add(self.sxx, other.sxx),
            np.add(self.sxy, other.sxy),
            np.add(self.syy, other.syy),
        )

    def ratio(self) -> FloatArray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(np.divide(self.sy, self.sx), dtype=np.float64)

    def unit_variance(self, center: ArrayLike, binary: bool) -> FloatArray:
        """Variance of one session's influence (y − center·x) / mean(x): Var(ratio) ≈ this / n.
        For counts of events the floor is the binomial variance at (Σy + 1) / (Σx + 2), so a
        version with no errors yet never gets a zero variance."""
        with np.errstate(divide="ignore", invalid="ignore"):
            n = np.asarray(self.n, dtype=np.float64)
            x_mean = np.divide(self.sx, n)
            second = (
                np.asarray(self.syy) - 2 * center * np.asarray(self.sxy)
                + np.square(center) * np.asarray(self.sxx)
            ) / n
            var = np.maximum(second, 0.0) / np.square(x_mean)
            if binary:
                p = (np.asarray(self.sy) + 1.0) / (np.asarray(self.sx) + 2.0)
                var = np.maximum(var, p * (1 - p) / x_mean)
        return np.asarray(var, dtype=np.float64)


@dataclass(frozen=True)
class NormalMixtureMethod:
    """alpha: the probability that the sequence ever misses the truth (two-sided). mixing: the
    number of effective sessions, n_c·n_b / (n_b + w²·n_c), at which the boundary is tightest."""

    alpha: float = 0.05
    mixing: float = 100.0

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if self.mixing <= 0:
            raise ValueError(f"mixing must be a positive number of sessions, got {self.mixing}")

    def mean(self, arm: ArmSample) -> MeanBounds:
        if arm.units == 0:
            return MeanBounds(float("nan"), -math.inf, math.inf)
        m = Moments.of(arm)
        estimate = float(m.ratio())
        variance = float(m.unit_variance(estimate, arm.binary)) / arm.sessions
        half = float(z_multiplier(arm.sessions, self.alpha, self.mixing)) * math.sqrt(variance)
        return MeanBounds(estimate, estimate - half, estimate + half)

    def contrast(self, candidate: ArmSample, baseline: ArmSample, weight: float) -> ContrastBounds:
        binary = candidate.binary and baseline.binary
        bounds = self.contrast_moments(Moments.of(candidate), Moments.of(baseline), weight, binary)
        return ContrastBounds(*(float(v) for v in _fields(bounds)))

    def contrast_moments(
        self, candidate: Moments, baseline: Moments, weight: float, binary: bool
    ) -> ContrastBounds:
        """θ = candidate − weight·baseline from sufficient statistics (arrays broadcast)."""
        n_c = np.asarray(candidate.n, dtype=np.float64)
        n_b = np.asarray(baseline.n, dtype=np.float64)
        r_c, r_b = candidate.ratio(), baseline.ratio()
        estimate = r_c - weight * r_b
        with np.errstate(divide="ignore", invalid="ignore"):
            own = (
                candidate.unit_variance(r_c, binary) / n_c
                + weight**2 * baseline.unit_variance(r_b, binary) / n_b
            )
            pooled = candidate + baseline
            null = pooled.unit_variance(pooled.ratio(), binary) * (1 / n_c + weight**2 / n_b)
            information = 1 / (1 / n_c + weight**2 / n_b)
        z = z_multiplier(np.nan_to_num(information, nan=0.0), self.alpha, self.mixing)
        half, null_half = z * np.sqrt(own), z * np.sqrt(null)
        return ContrastBounds(
            estimate, estimate - half, estimate + half, estimate - null_half, estimate + null_half
        )


def _fields(b: ContrastBounds) -> tuple[ArrayLike, ...]:
    return (b.estimate, b.lower, b.upper, b.null_lower, b.null_upper)
