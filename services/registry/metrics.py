"""The metrics a rollout or experiment may watch. Names are checked here, at creation; the
defaults for direction and tolerance belong to telemetry's analysis, which applies them when a
metric leaves them out."""

from __future__ import annotations

import re
from typing import Any

from services.common.errors import InvalidArgument

KNOWN = ("session_error_rate", "invocation_error_rate", "latency_p95", "latency_p99",
         "tool_failure_rate", "tokens_per_session")
SCORE = re.compile(r"^score:[a-z][a-z0-9_.-]{0,62}$")
DEFAULT_METRICS = ("session_error_rate", "invocation_error_rate", "latency_p95")
DIRECTIONS = ("LOWER_IS_BETTER", "HIGHER_IS_BETTER")


def validate_metrics(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checks names and tolerances; keeps only what the user gave. Empty means the defaults."""
    if not metrics:
        return [{"name": n} for n in DEFAULT_METRICS]
    out = []
    seen = set()
    for i, m in enumerate(metrics):
        field = f"metrics[{i}]"
        name = m.get("name", "")
        if name not in KNOWN and not SCORE.match(name):
            raise InvalidArgument.field(
                f"{field}.name", f"{name!r} is not a metric: use one of {', '.join(KNOWN)} or score:<name>"
            )
        if name in seen:
            raise InvalidArgument.field(f"{field}.name", f"{name} is listed twice")
        seen.add(name)
        spec: dict[str, Any] = {"name": name}
        if m.get("tolerance") is not None:
            if m["tolerance"] < 0:
                raise InvalidArgument.field(f"{field}.tolerance", f"{m['tolerance']} must not be negative")
            spec["tolerance"] = float(m["tolerance"])
        if m.get("fail_margin") is not None:
            if m["fail_margin"] < 0:
                raise InvalidArgument.field(f"{field}.fail_margin", f"{m['fail_margin']} must not be negative")
            spec["fail_margin"] = float(m["fail_margin"])
        if m.get("relative") is not None:
            spec["relative"] = bool(m["relative"])
        if m.get("direction"):
            if m["direction"] not in DIRECTIONS:
                raise InvalidArgument.field(f"{field}.direction", f"{m['direction']!r} is not a direction")
            spec["direction"] = m["direction"]
        out.append(spec)
    return out
