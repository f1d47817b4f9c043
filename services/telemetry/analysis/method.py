"""The interface every always-valid method implements: a confidence sequence for one version's
mean and for the contrast candidate − weight·baseline, over per-session samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.telemetry.analysis.boundary import ArrayLike, FloatArray


@dataclass(frozen=True, eq=False)
class ArmSample:
    """One version's measurements with the session as the unit, in the order the sessions started:
    the metric is sum(y) / sum(x) (x is 1 for a per-session mean). `binary` marks counts of events
    among x trials (errors among invocations), whose variance has a binomial floor."""

    y: FloatArray
    x: FloatArray
    binary: bool = False

    @classmethod
    def of(
        cls,
        y: Sequence[float] | FloatArray,
        x: Sequence[float] | FloatArray | None = None,
        *,
        binary: bool = False,
    ) -> ArmSample:
        y_arr = np.asarray(y, dtype=np.float64)
        x_arr = np.ones_like(y_arr) if x is None else np.asarray(x, dtype=np.float64)
        if y_arr.shape != x_arr.shape or y_arr.ndim != 1:
            raise ValueError("y and x must be one-dimensional and of the same length")
        return cls(y_arr, x_arr, binary)

    @property
    def sessions(self) -> int:
        return int(self.y.size)

    @property
    def units(self) -> float:
        """The denominator: invocations, tool calls, or sessions for a per-session mean."""
        return float(self.x.sum())

    @property
    def estimate(self) -> float:
        units = self.units
        return float(self.y.sum() / units) if units > 0 else float("nan")


@dataclass(frozen=True)
class MeanBounds:
    """A time-uniform confidence sequence for one version's metric, at the current look."""

    estimate: float
    lower: float
    upper: float


@dataclass(frozen=True, eq=False)
class ContrastBounds:
    """A time-uniform confidence sequence for θ = candidate − weight·baseline at the current look
    (numpy arrays when computed for many simulated looks at once). `lower`/`upper` use each
    version's own variance (valid whatever θ is); `null_lower`/`null_upper` use the variance of
    the hypothesis that both versions are the same (pooled), the right one for testing θ = 0."""

    estimate: ArrayLike
    lower: ArrayLike
    upper: ArrayLike
    null_lower: ArrayLike
    null_upper: ArrayLike


class SequentialMethod(Protocol):
    """An always-valid (anytime) method: its intervals may be looked at after every session."""

    @property
    def alpha(self) -> float:
        """The probability that the sequence ever excludes the truth."""
        ...

    def mean(self, arm: ArmSample) -> MeanBounds: ...

    def contrast(
        self, candidate: ArmSample, baseline: ArmSample, weight: float
    ) -> ContrastBounds: ...
