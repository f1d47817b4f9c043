"""The metrics a rollout or experiment may watch, with their default direction and tolerance."""

from __future__ import annotations

import re
from typing import Any

from services.common.errors import InvalidArgument

# name -> (direction, default tolerance, relative?)
KNOWN = {
    "session_error_rate": ("LOWER_IS_BETTER", 0.01, False),
    "invocation_error_rate": ("LOWER_IS_BETTER", 0.01, False),
    "latency_p95": ("LOWER_IS_BETTER", 0.10, True),
    "latency_p99": ("LOWER_IS_BETTER", 0.10, True),
    "tool_failure_rate": ("LOWER_IS_BETTER", 0.01, False),
    "tokens_per_session": ("LOWER_IS_BETTER", 0.10, True),
}
SCORE = re.compile(r"^score:[a-z][a-z0-9_.-]{0,62}$")
DEFAULT_METRICS = ("session_error_rate", "latency_p95")


def validate_metrics(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fills defaults and checks names, directions and tolerances. Empty means the defaults."""
    if not metrics:
        metrics = [{"name": n} for n in DEFAULT_METRICS]
    out = []
    seen = set()
    for i, m in enumerate(metrics):
        field = f"metrics[{i}]"
        name = m.get("name", "")
        if name in KNOWN:
            direction, tolerance, relative = KNOWN[name]
        elif SCORE.match(name):
            direction, tolerance, relative = "HIGHER_IS_BETTER", 0.05, False
        else:
            raise InvalidArgument.field(
                f"{field}.name",
                f"{name!r} is not a metric: use one of {', '.join(KNOWN)} or score:<name>",
            )
        if name in seen:
            raise InvalidArgument.field(f"{field}.name", f"{name} is listed twice")
        seen.add(name)
        tol = m.get("tolerance")
        if tol is not None and tol < 0:
            raise InvalidArgument.field(f"{field}.tolerance", f"{tol} must not be negative")
        out.append({
            "name": name,
            "direction": m.get("direction") or direction,
            "tolerance": tolerance if tol is None else float(tol),
            "relative": relative if m.get("relative") is None else bool(m["relative"]),
        })
    return out
