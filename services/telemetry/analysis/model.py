"""The values the analysis speaks in: what one session contributed, a metric's direction and
thresholds, the verdicts, and the knobs (alpha, mixing, minimum sample)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True)
class SessionObservation:
    """One session of one version, as telemetry computes it from the session's spans. Lists of
    sessions are in the order the sessions started (the bounded-score method depends on it)."""

    invocations: int = 0
    failed_invocations: int = 0
    latencies_ms: tuple[float, ...] = ()  # one per invocation
    tool_calls: int = 0
    tool_failures: int = 0
    tokens: int = 0
    scores: Mapping[str, float] = field(default_factory=dict[str, float])  # named scores in [0, 1]
    failed: bool = False  # a session-level failure besides failed invocations

    def __post_init__(self) -> None:
        counts = {
            "invocations": self.invocations,
            "failed_invocations": self.failed_invocations,
            "tool_calls": self.tool_calls,
            "tool_failures": self.tool_failures,
            "tokens": self.tokens,
        }
        for name, count in counts.items():
            if count < 0:
                raise ValueError(f"session observation: {name} must be >= 0")
        if self.failed_invocations > self.invocations:
            raise ValueError("session observation: failed_invocations exceeds invocations")
        if self.tool_failures > self.tool_calls:
            raise ValueError("session observation: tool_failures exceeds tool_calls")
        if any(not math.isfinite(v) or v < 0 for v in self.latencies_ms):
            raise ValueError("session observation: latencies_ms must be finite and >= 0")
        for name, value in self.scores.items():
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"session observation: score {name!r} must be in [0, 1]")

    @property
    def had_failure(self) -> bool:
        return self.failed or self.failed_invocations > 0


class Direction(StrEnum):
    LOWER_IS_BETTER = "lower_is_better"
    HIGHER_IS_BETTER = "higher_is_better"

    @property
    def sign(self) -> int:
        """+1 when an increase is a degradation."""
        return 1 if self is Direction.LOWER_IS_BETTER else -1


@dataclass(frozen=True)
class Threshold:
    """How much worse the candidate may be: an absolute amount in the metric's unit, or a
    fraction of the baseline's estimate (relative=True: 0.2 means 20% worse)."""

    value: float
    relative: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.value) and self.value >= 0):
            raise ValueError(f"a tolerance must be a finite number >= 0, got {self.value}")

    def absolute(self, baseline_estimate: float) -> float:
        return self.value * abs(baseline_estimate) if self.relative else self.value


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class AnalysisConfig:
    """alpha: the chance that an identical candidate is ever rolled back, however often the
    analysis is looked at (split evenly over the metrics with a zero fail margin; the intervals
    are two-sided confidence sequences). mixing_sessions: the effective sample size at which the
    boundary is tightest. min_sessions: sessions each version needs before a pass.
    min_fail_sessions: sessions each version needs before a failure (no verdict on a handful)."""

    alpha: float = 0.05
    mixing_sessions: float = 100.0
    min_sessions: int = 200
    min_fail_sessions: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be between 0 and 1, got {self.alpha}")
        if self.mixing_sessions <= 0:
            raise ValueError("mixing_sessions must be positive")
        if self.min_sessions < 1 or self.min_fail_sessions < 1:
            raise ValueError("min_sessions and min_fail_sessions must be at least 1")
