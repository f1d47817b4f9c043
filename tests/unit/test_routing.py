"""Session bucketing: deterministic, proportional, and stable when weights move."""

from __future__ import annotations

from collections import Counter

import pytest

from services.common.endpoints import TrafficShare as Share
from services.router.routing import BUCKETS, bucket, choose

KEYS = [f"session-{i}" for i in range(2000)]


def assign(shares: list[Share], salt: str = "salt-1") -> dict[str, int]:
    return {key: choose(shares, bucket(salt, key)) for key in KEYS}


def test_bucketing_is_deterministic_and_in_range() -> None:
    first = [bucket("salt-1", k) for k in KEYS]
    assert first == [bucket("salt-1", k) for k in KEYS]
    assert all(0 <= b < BUCKETS for b in first)
    # Well spread: 2000 keys land in many distinct buckets.
    assert len(set(first)) > 1800


def test_the_salt_reshuffles_keys() -> None:
    # Two endpoints with different salts do not send the same sessions to their canaries.
    a, b = [bucket("salt-1", k) for k in KEYS], [bucket("salt-2", k) for k in KEYS]
    assert sum(x == y for x, y in zip(a, b)) < 20


def test_a_50_50_split_over_2000_keys_is_within_a_few_percent() -> None:
    counts = Counter(assign([Share(1, 5000), Share(2, 5000)]).values())
    assert set(counts) == {1, 2}
    for version in (1, 2):
        assert abs(counts[version] - 1000) <= 80, counts  # within 4 points of 50%


def test_a_single_version_takes_every_key() -> None:
    assert set(assign([Share(3, BUCKETS)]).values()) == {3}


@pytest.mark.parametrize(("stable", "canary"), [(1, 2), (2, 1), (4, 9)])
def test_raising_a_canary_only_moves_keys_from_stable_to_canary(stable: int, canary: int) -> None:
    steps = [500, 1000, 2500, 5000, 9000]
    before = assign([Share(stable, BUCKETS - steps[0]), Share(canary, steps[0])])
    for weight in steps[1:]:
        after = assign([Share(stable, BUCKETS - weight), Share(canary, weight)])
        moved = {k: (before[k], after[k]) for k in KEYS if before[k] != after[k]}
        assert moved, "raising the canary moved no key at all"
        assert set(moved.values()) == {(stable, canary)}
        # About the right number of keys moved (the added weight's share of 2000).
        share = sum(1 for v in after.values() if v == canary) / len(KEYS)
        assert abs(share - weight / BUCKETS) < 0.04
        before = after


def test_the_order_shares_are_given_in_does_not_matter() -> None:
    forward = assign([Share(1, 2000), Share(2, 3000), Share(3, 5000)])
    backward = assign([Share(3, 5000), Share(2, 3000), Share(1, 2000)])
    assert forward == backward


def test_a_three_way_split_is_proportional() -> None:
    counts = Counter(assign([Share(1, 2000), Share(2, 3000), Share(3, 5000)]).values())
    for version, weight in ((1, 0.2), (2, 0.3), (3, 0.5)):
        assert abs(counts[version] / len(KEYS) - weight) < 0.04, counts


def test_in_a_three_way_split_raising_the_newest_moves_keys_only_towards_newer_versions() -> None:
    before = assign([Share(1, 8000), Share(2, 1500), Share(3, 500)])
    after = assign([Share(1, 7500), Share(2, 1500), Share(3, 1000)])
    moved = {(before[k], after[k]) for k in KEYS if before[k] != after[k]}
    assert moved and all(old < new for old, new in moved), moved
    # The canary loses nothing it had.
    assert all(after[k] == 3 for k in KEYS if before[k] == 3)
    # Taking weight from the middle version only moves keys from it to the canary.
    later = assign([Share(1, 7500), Share(2, 1000), Share(3, 1500)])
    assert {(after[k], later[k]) for k in KEYS if after[k] != later[k]} == {(2, 3)}


def test_bucket_edges() -> None:
    shares = [Share(1, 9500), Share(2, 500)]
    # The newest version owns the first range; the boundary belongs to the next range.
    assert choose(shares, 0) == 2
    assert choose(shares, 499) == 2
    assert choose(shares, 500) == 1
    assert choose(shares, BUCKETS - 1) == 1
