"""Canary: 10% of new sessions, analysed, then 100%."""

from __future__ import annotations

from typing import Any

from services.registry.strategies.weights import weight_steps


def canary_steps(gate_max_s: int) -> list[dict[str, Any]]:
    return weight_steps([10, 100], gate_max_s)
