"""Traffic splits as a user writes them: percentages with at most two decimals adding up to 100,
stored in basis points and ordered by version."""

from __future__ import annotations

import pytest

from services.common.endpoints import BASIS_POINTS, TrafficShare
from services.common.errors import InvalidArgument
from services.registry.rules import normalize_split


def test_a_split_is_ordered_by_version_and_kept_in_basis_points() -> None:
    split = normalize_split([(3, 10), (1, 85.5), (2, 4.5)])
    assert split == (TrafficShare(1, 8550), TrafficShare(2, 450), TrafficShare(3, 1000))
    assert [s.percent for s in split] == [85.5, 4.5, 10.0]
    assert sum(s.basis_points for s in split) == BASIS_POINTS


@pytest.mark.parametrize(
    "split",
    [
        [(1, 100)],
        [(1, 100.0)],
        [(1, 33.33), (2, 33.33), (3, 33.34)],
        # Floating point sums that are not exactly 100 in binary still add up.
        [(1, 70.1), (2, 29.9)],
        [(1, 0.01), (2, 99.99)],
        [(7, 10)] + [(v, 10) for v in range(8, 17)],
    ],
)
def test_valid_splits(split: list[tuple[int, float]]) -> None:
    shares = normalize_split(split)
    assert sum(s.basis_points for s in shares) == BASIS_POINTS
    assert [s.version for s in shares] == sorted(v for v, _ in split)


@pytest.mark.parametrize(
    ("split", "field", "words"),
    [
        ([], "endpoint.traffic", "at least one version"),
        ([(1, 50), (2, 40)], "endpoint.traffic", "add up to 90%, not 100%"),
        ([(1, 60), (2, 60)], "endpoint.traffic", "add up to 120%"),
        ([(1, 99.99)], "endpoint.traffic", "add up to 99.99%"),
        ([(0, 100)], "endpoint.traffic[0].version", "required"),
        ([(1, 50), (-2, 50)], "endpoint.traffic[1].version", "required"),
        ([(1, 50), (1, 50)], "endpoint.traffic[1].version", "appears twice"),
        ([(1, 100.001)], "endpoint.traffic[0].percent", "more than two decimals"),
        ([(1, 33.333), (2, 66.667)], "endpoint.traffic[0].percent", "more than two decimals"),
        ([(1, 0), (2, 100)], "endpoint.traffic[0].percent", "must be > 0"),
        ([(1, -10), (2, 110)], "endpoint.traffic[0].percent", "must be > 0"),
        ([(1, 150)], "endpoint.traffic[0].percent", "<= 100"),
        ([(1, float("nan"))], "endpoint.traffic[0].percent", "nan"),
        ([(1, float("inf"))], "endpoint.traffic[0].percent", "inf"),
    ],
)
def test_invalid_splits_name_the_field(
    split: list[tuple[int, float]], field: str, words: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        normalize_split(split)
    err = info.value
    assert [v.field for v in err.violations] == [field]
    assert words in err.message
