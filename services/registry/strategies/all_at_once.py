"""All at once: 100% of new sessions straight away, no analysis gate."""

from __future__ import annotations

from services.registry.rollout_model import SetWeight, Step


def all_at_once_steps(gate_max_s: int) -> tuple[Step, ...]:
    return (SetWeight(100.0),)
