"""Sample-ratio mismatch: are the sessions each variant received consistent with the configured
split? A chi-square goodness-of-fit test; p < 0.001 means the assignment (or the telemetry) is
broken and no effect estimate can be trusted, so no winner may be named."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

SRM_P_VALUE = 0.001


@dataclass(frozen=True)
class SampleRatioCheck:
    observed: Mapping[str, int]
    expected_share: Mapping[str, float]
    chi_square: float
    p_value: float
    mismatch: bool


def sample_ratio_check(
    observed: Mapping[str, int], split: Mapping[str, float], threshold: float = SRM_P_VALUE
) -> SampleRatioCheck:
    """`split` maps each variant to its configured weight (percentages or shares)."""
    if set(observed) != set(split):
        raise ValueError(
            f"sample ratio check: observed variants {sorted(observed)} differ from the split's "
            f"{sorted(split)}"
        )
    if len(split) < 2:
        raise ValueError("sample ratio check: an experiment needs at least two variants")
    if any(not math.isfinite(w) or w <= 0 for w in split.values()):
        raise ValueError("sample ratio check: every variant's weight must be positive")
    if any(n < 0 for n in observed.values()):
        raise ValueError("sample ratio check: session counts must be >= 0")
    names = sorted(split)
    total_weight = sum(split.values())
    shares = {name: split[name] / total_weight for name in names}
    counts = np.array([observed[name] for name in names], dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return SampleRatioCheck(dict(observed), shares, 0.0, 1.0, False)
    expected = total * np.array([shares[name] for name in names])
    chi2 = float(np.sum(np.square(counts - expected) / expected))
    p = float(stats.chi2.sf(chi2, len(names) - 1))
    return SampleRatioCheck(dict(observed), shares, chi2, p, p < threshold)
