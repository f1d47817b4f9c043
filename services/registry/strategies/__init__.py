"""Rollout strategies: each turns its options into the steps a rollout executes (set a weight,
pause, an analysis gate, a manual gate). One file per strategy; `build_steps` picks by name."""

from __future__ import annotations

from collections.abc import Callable

from services.common.errors import InvalidArgument
from services.registry.rollout_model import Step
from services.registry.strategies.all_at_once import all_at_once_steps
from services.registry.strategies.canary import canary_steps
from services.registry.strategies.linear import linear_steps
from services.registry.strategies.weights import weight_steps

DEFAULT_GATE_MAX_S = 3600

PRESETS: dict[str, Callable[[int], tuple[Step, ...]]] = {
    "canary": canary_steps,
    "linear": linear_steps,
    "all-at-once": all_at_once_steps,
}


def build_steps(strategy: str, gate_max_s: int = DEFAULT_GATE_MAX_S) -> tuple[Step, ...]:
    preset = PRESETS.get(strategy)
    if preset is None:
        raise InvalidArgument.field(
            "rollout.strategy", f"{strategy!r} is not one of {', '.join(PRESETS)} (or give explicit steps)"
        )
    return preset(gate_max_s)


__all__ = ["DEFAULT_GATE_MAX_S", "PRESETS", "build_steps", "weight_steps"]
