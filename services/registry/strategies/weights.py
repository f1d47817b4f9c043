"""Explicit weights (`--steps 5,50,100`): an analysis gate after every weight below 100."""

from __future__ import annotations

from services.registry.rollout_model import AnalysisGate, SetWeight, Step


def weight_steps(weights: list[float], gate_max_s: int) -> tuple[Step, ...]:
    steps: list[Step] = []
    for w in weights:
        steps.append(SetWeight(w))
        if w < 100:
            steps.append(AnalysisGate(gate_max_s))
    return tuple(steps)
