"""The two-sided normal-mixture uniform boundary of Howard, Ramdas, McAuliffe & Sekhon (2021),
"Time-uniform, nonparametric, nonasymptotic confidence sequences" (Annals of Statistics 49(2)):
a sum S_v with intrinsic time (variance) v stays within ±u(v) for all v at once with probability
1 − alpha, where u(v) = sqrt((v + ρ) · log((v + ρ) / (ρ · alpha²))). It is the same formula as
confseq's TwoSidedNormalMixture::bound, and ρ is chosen the way confseq's best_rho chooses it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
AnyFloats = npt.NDArray[np.floating[Any]]
ArrayLike = float | np.floating[Any] | AnyFloats


def optimal_rho(v_opt: float, alpha: float) -> float:
    """The mixture variance ρ that makes u(v)/v smallest near v = v_opt (confseq's best_rho)."""
    if v_opt <= 0:
        raise ValueError(f"v_opt must be positive, got {v_opt}")
    check_alpha(alpha)
    log_inv = math.log(1 / alpha)
    return v_opt / (2 * log_inv + math.log1p(2 * log_inv))


def normal_mixture_bound(v: ArrayLike, alpha: float, v_opt: float) -> FloatArray:
    """u(v) in the units of the sum; equals confseq.boundaries.normal_mixture_bound(v, alpha,
    v_opt, alpha_opt=alpha, is_one_sided=False)."""
    rho = optimal_rho(v_opt, alpha)
    v_arr = np.asarray(v, dtype=np.float64)
    return np.sqrt((v_arr + rho) * (np.log1p(v_arr / rho) + 2 * math.log(1 / alpha)))


def z_multiplier(information: ArrayLike, alpha: float, mixing: float) -> FloatArray:
    """How many standard errors wide a confidence sequence is after `information` effective
    observations, with the boundary tightest around `mixing` of them: u(n)/sqrt(n) for a sum of n
    unit-variance terms. Infinite before any observation."""
    n = np.asarray(information, dtype=np.float64)
    safe = np.where(n > 0, n, 1.0)
    z = normal_mixture_bound(safe, alpha, mixing) / np.sqrt(safe)
    return np.where(n > 0, z, np.inf)


def check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1 (exclusive), got {alpha}")
