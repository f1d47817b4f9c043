"""Explicit weights (`--steps 5,50,100`): an analysis gate after every weight below 100."""

from __future__ import annotations

from typing import Any


def weight_steps(weights: list[float], gate_max_s: int) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    for w in weights:
        steps.append({"set_weight": w})
        if w < 100:
            steps.append({"analysis": {"max_duration_s": gate_max_s}})
    return steps
