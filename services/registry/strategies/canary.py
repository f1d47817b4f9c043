"""Canary: 10% of new sessions, analysed, then 100%."""

from __future__ import annotations

from services.registry.rollout_model import Step
from services.registry.strategies.weights import weight_steps


def canary_steps(gate_max_s: int) -> tuple[Step, ...]:
    return weight_steps([10, 100], gate_max_s)
