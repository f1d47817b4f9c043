"""All at once: 100% of new sessions straight away, no analysis gate."""

from __future__ import annotations

from typing import Any


def all_at_once_steps(gate_max_s: int) -> list[dict[str, Any]]:
    return [{"set_weight": 100.0}]
