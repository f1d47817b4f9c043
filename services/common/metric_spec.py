"""A metric as rollouts, experiments and comparisons name it: which one, and how to judge it where
its defaults will not do. The registry keeps it in rollout and experiment specs and asks telemetry
with it; telemetry fills in what is left out. No gRPC here (metric_protos.py converts it)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Direction(enum.Enum):
    LOWER_IS_BETTER = "LOWER_IS_BETTER"
    HIGHER_IS_BETTER = "HIGHER_IS_BETTER"


@dataclass(frozen=True)
class MetricSpec:
    """A metric and how to judge it; what is left out takes telemetry's defaults."""

    name: str
    direction: Direction | None = None
    tolerance: float | None = None
    relative: bool | None = None
    fail_margin: float | None = None
