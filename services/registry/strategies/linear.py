"""Linear: 10%, 20%, ... 100%, analysed at every step."""

from __future__ import annotations

from services.registry.rollout_model import Step
from services.registry.strategies.weights import weight_steps


def linear_steps(gate_max_s: int) -> tuple[Step, ...]:
    return weight_steps([float(w) for w in range(10, 101, 10)], gate_max_s)
