"""Deterministic bucketing: bucket = hash(endpoint salt, routing key) mod 10000, and each version
owns a contiguous range of buckets in a stable order (by version number). Raising a canary from
5% to 10% therefore only moves buckets from the other versions to the canary."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from services.common.endpoints import BASIS_POINTS, TrafficShare

BUCKETS = BASIS_POINTS


def bucket(salt: str, key: str) -> int:
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def choose(shares: Sequence[TrafficShare], bucket_no: int) -> int:
    """The version whose range holds `bucket_no`. Shares must add up to BUCKETS; ranges are laid
    out in descending version order so the newest version's range starts at 0 and a growing
    canary takes buckets from the end of the older versions' ranges."""
    start = 0
    ordered = sorted(shares, key=lambda s: -s.version)
    for share in ordered:
        start += share.basis_points
        if bucket_no < start:
            return share.version
    return ordered[-1].version
