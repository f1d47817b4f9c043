"""Traffic splits: validation of the percentages a user gives, in basis points (1/100 of a percent)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from services.common.endpoints import BASIS_POINTS, TrafficShare
from services.common.errors import InvalidArgument


def normalize_split(shares: Iterable[tuple[int, float]]) -> tuple[TrafficShare, ...]:
    """Checks a split (version → percent) and returns it ordered by version. Ordering by version
    keeps bucket ranges stable: raising a newer version's weight only moves buckets from older ones."""
    out: dict[int, int] = {}
    for i, (version, percent) in enumerate(shares):
        field = f"endpoint.traffic[{i}]"
        if version <= 0:
            raise InvalidArgument.field(f"{field}.version", "is required")
        if version in out:
            raise InvalidArgument.field(f"{field}.version", f"version {version} appears twice")
        if not math.isfinite(percent):
            raise InvalidArgument.field(f"{field}.percent", f"{percent} is not a number between 0 and 100")
        bp = round(percent * 100)
        if abs(bp - percent * 100) > 1e-6:
            raise InvalidArgument.field(f"{field}.percent", f"{percent} has more than two decimals")
        if bp <= 0 or bp > BASIS_POINTS:
            raise InvalidArgument.field(f"{field}.percent", f"{percent} must be > 0 and <= 100")
        out[version] = bp
    if not out:
        raise InvalidArgument.field("endpoint.traffic", "needs at least one version")
    total = sum(out.values())
    if total != BASIS_POINTS:
        raise InvalidArgument.field(
            "endpoint.traffic", f"percentages add up to {total / 100:g}%, not 100%"
        )
    return tuple(TrafficShare(v, out[v]) for v in sorted(out))
