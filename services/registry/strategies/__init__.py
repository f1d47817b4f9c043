"""Rollout strategies: each turns its options into the list of steps a rollout executes.

A step is one of {"set_weight": percent}, {"pause_s": seconds}, {"analysis": {"max_duration_s": s}},
{"manual": {}}. One file per strategy; `build_steps` picks by name."""

from __future__ import annotations

from typing import Any

from services.common.errors import InvalidArgument
from services.registry.strategies.all_at_once import all_at_once_steps
from services.registry.strategies.canary import canary_steps
from services.registry.strategies.linear import linear_steps
from services.registry.strategies.weights import weight_steps

Step = dict[str, Any]
DEFAULT_GATE_MAX_S = 3600

PRESETS = {
    "canary": canary_steps,
    "linear": linear_steps,
    "all-at-once": all_at_once_steps,
}


def build_steps(strategy: str, gate_max_s: int = DEFAULT_GATE_MAX_S) -> list[Step]:
    preset = PRESETS.get(strategy)
    if preset is None:
        raise InvalidArgument.field(
            "rollout.strategy", f"{strategy!r} is not one of {', '.join(PRESETS)} (or give explicit steps)"
        )
    return preset(gate_max_s)


def validate_steps(steps: list[Step]) -> list[Step]:
    """Checks explicit steps: weights strictly increase, stay within (0, 100], and end at 100."""
    if not steps:
        raise InvalidArgument.field("rollout.steps", "needs at least one step")
    last = 0.0
    for i, step in enumerate(steps):
        field = f"rollout.steps[{i}]"
        if len(step) != 1:
            raise InvalidArgument.field(field, "must be exactly one of set_weight, pause, analysis, manual")
        if "set_weight" in step:
            w = float(step["set_weight"])
            if not 0 < w <= 100:
                raise InvalidArgument.field(f"{field}.set_weight", f"{w:g} must be > 0 and <= 100")
            if w <= last:
                raise InvalidArgument.field(
                    f"{field}.set_weight", f"{w:g} does not increase on the previous weight {last:g}"
                )
            last = w
        elif "pause_s" in step:
            if float(step["pause_s"]) <= 0:
                raise InvalidArgument.field(f"{field}.pause", "must be a positive duration")
        elif "analysis" in step:
            if float(step["analysis"].get("max_duration_s", 0)) <= 0:
                raise InvalidArgument.field(f"{field}.analysis.max_duration", "must be a positive duration")
        elif "manual" not in step:
            raise InvalidArgument.field(field, "must be one of set_weight, pause, analysis, manual")
    if last != 100:
        raise InvalidArgument.field("rollout.steps", f"must end at set_weight 100 (the last weight is {last:g})")
    return steps


__all__ = ["PRESETS", "Step", "build_steps", "validate_steps", "weight_steps"]
