"""Simulated canary rollouts through the real analysis: how many candidate sessions a candidate
5 points worse on session errors (2% → 7%) takes to be rolled back, how often an identical one is
falsely rolled back, and how many sessions an identical one needs to be promoted through the
default canary (10% then 100%: one analysis gate). `python -m bench.rollouts_sim` prints JSON.

Each look adds 10 candidate and 90 baseline sessions (a 10% canary) and judges them with
judge_moments — the normal-mixture path analyze_rollout runs for every non-score metric, on
sufficient statistics so a thousand rollouts are one numpy call. A rollout that is neither failed
nor passed by the cap counts as not failed and not passed. Candidate sessions are assumed to
arrive at ARRIVALS_PER_SECOND, so wall time = candidate sessions / rate."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.telemetry.analysis.metrics import (
    DEFAULT_METRICS,
    SESSION_ERROR_RATE,
    MetricSpec,
    metric,
)
from services.telemetry.analysis.model import AnalysisConfig, SessionObservation, Verdict
from services.telemetry.analysis.normal_mixture import Moments
from services.telemetry.analysis.rollout import analyze_rollout, judge_moments

SEED = 20260806
ROLLOUTS = 4000
LOOK_EVERY = 10  # candidate sessions between two looks
CANARY_WEIGHT = 0.10
CAP = 2000  # candidate sessions after which a simulated rollout stops undecided
ARRIVALS_PER_SECOND = 1.0  # candidate sessions per second
BASELINE_ERROR_RATE = 0.02
BAD_CANDIDATE_ERROR_RATE = 0.07
FULL_METRIC_ROLLOUTS = 100  # through analyze_rollout on synthetic spans, all default metrics
FULL_METRIC_CAP = 1000

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class Outcomes:
    """Per simulated rollout: rolled back, promoted, and candidate sessions at the decision
    (the cap when undecided)."""

    failed: BoolArray
    passed: BoolArray
    candidate_sessions: IntArray

    def sessions_when(self, mask: BoolArray) -> dict[str, float | None]:
        """p50/p90 of candidate sessions to the event, counting rollouts without it as never."""
        values = np.where(mask, self.candidate_sessions, np.iinfo(np.int64).max)
        out: dict[str, float | None] = {}
        for name, q in (("p50", 0.5), ("p90", 0.9)):
            v = int(np.quantile(values, q, method="inverted_cdf"))
            out[name] = None if v == np.iinfo(np.int64).max else float(v)
        return out


def baseline_per_look(look_every: int = LOOK_EVERY, weight: float = CANARY_WEIGHT) -> int:
    return round(look_every * (1 - weight) / weight)


def simulate_session_errors(
    rng: np.random.Generator,
    rollouts: int,
    baseline_rate: float,
    candidate_rate: float,
    spec: MetricSpec | None = None,
    config: AnalysisConfig | None = None,
    *,
    look_every: int = LOOK_EVERY,
    canary_weight: float = CANARY_WEIGHT,
    cap: int = CAP,
) -> Outcomes:
    """Rollouts judged on session_error_rate alone, every `look_every` candidate sessions."""
    spec = spec or metric(SESSION_ERROR_RATE)
    config = config or AnalysisConfig()
    looks = cap // look_every
    per_base = baseline_per_look(look_every, canary_weight)
    n_c = np.broadcast_to(look_every * np.arange(1, looks + 1, dtype=np.float64), (rollouts, looks))
    n_b = n_c * (per_base / look_every)
    e_c = rng.binomial(look_every, candidate_rate, (rollouts, looks)).cumsum(1).astype(np.float64)
    e_b = rng.binomial(per_base, baseline_rate, (rollouts, looks)).cumsum(1).astype(np.float64)
    # A session is 0 or 1, so y² = xy = y and x² = x: the moments are counts.
    judged = judge_moments(
        spec, Moments(n_c, n_c, e_c, n_c, e_c, e_c), Moments(n_b, n_b, e_b, n_b, e_b, e_b),
        config, binary=True,
    )
    return first_decision(np.asarray(judged.failed), np.asarray(judged.passed), look_every)


def first_decision(failed: BoolArray, passed: BoolArray, look_every: int) -> Outcomes:
    decided: BoolArray = failed | passed
    any_decision = np.asarray(decided.any(axis=1), dtype=np.bool_)
    earliest = np.asarray(np.argmax(decided, axis=1), dtype=np.int64)
    first = np.where(any_decision, earliest, np.int64(decided.shape[1] - 1))
    rows: IntArray = np.arange(decided.shape[0], dtype=np.int64)
    return Outcomes(
        any_decision & failed[rows, first],
        any_decision & passed[rows, first],
        (first + 1) * look_every,
    )


def synthetic_sessions(
    rng: np.random.Generator, n: int, session_error_rate: float
) -> list[SessionObservation]:
    """Sessions as telemetry would summarise them: 1 + Poisson(2) invocations with log-normal
    latencies sharing a per-session slowness, Poisson(3) tool calls failing 5% of the time,
    tokens proportional to invocations; a failing session has one failed invocation."""
    invocations = 1 + rng.poisson(2.0, n)
    failing = rng.random(n) < session_error_rate
    slowness = rng.normal(0.0, 0.3, n)
    tools = rng.poisson(3.0, n)
    tool_failures = rng.binomial(tools, 0.05)
    tokens = np.rint(invocations * rng.lognormal(math.log(1200), 0.4, n)).astype(np.int64)
    sessions: list[SessionObservation] = []
    for i in range(n):
        k = int(invocations[i])
        latencies = rng.lognormal(math.log(800) + slowness[i], 0.5, k)
        sessions.append(
            SessionObservation(
                invocations=k,
                failed_invocations=int(failing[i]),
                latencies_ms=tuple(float(v) for v in latencies),
                tool_calls=int(tools[i]),
                tool_failures=int(tool_failures[i]),
                tokens=int(tokens[i]),
            )
        )
    return sessions


def simulate_full_metrics(
    rng: np.random.Generator,
    rollouts: int,
    baseline_rate: float,
    candidate_rate: float,
    *,
    cap: int = FULL_METRIC_CAP,
    config: AnalysisConfig | None = None,
) -> Outcomes:
    """Rollouts through analyze_rollout with every default metric, looked at every 10 candidate
    sessions, on synthetic sessions (slower: a few hundred rollouts take tens of seconds)."""
    per_base = baseline_per_look()
    failed = np.zeros(rollouts, dtype=np.bool_)
    passed = np.zeros(rollouts, dtype=np.bool_)
    sessions = np.full(rollouts, cap, dtype=np.int64)
    for r in range(rollouts):
        baseline: list[SessionObservation] = []
        candidate: list[SessionObservation] = []
        while len(candidate) < cap:
            candidate += synthetic_sessions(rng, LOOK_EVERY, candidate_rate)
            baseline += synthetic_sessions(rng, per_base, baseline_rate)
            verdict = analyze_rollout(baseline, candidate, DEFAULT_METRICS, config).verdict
            if verdict is not Verdict.INCONCLUSIVE:
                failed[r], passed[r] = verdict is Verdict.FAIL, verdict is Verdict.PASS
                sessions[r] = len(candidate)
                break
    return Outcomes(failed, passed, sessions)


def _wall(sessions: dict[str, float | None]) -> dict[str, float | None]:
    return {k: None if v is None else v / ARRIVALS_PER_SECOND for k, v in sessions.items()}


def simulate(full_metric_rollouts: int = FULL_METRIC_ROLLOUTS) -> dict[str, object]:
    started = time.perf_counter()
    rng = np.random.default_rng(SEED)
    config = AnalysisConfig()
    spec = metric(SESSION_ERROR_RATE)
    bad = simulate_session_errors(rng, ROLLOUTS, BASELINE_ERROR_RATE, BAD_CANDIDATE_ERROR_RATE)
    same = simulate_session_errors(rng, ROLLOUTS, BASELINE_ERROR_RATE, BASELINE_ERROR_RATE)
    # The single-threshold rule (fail only when shown worse than the tolerance), for comparison.
    literal = dataclasses.replace(spec, fail_margin=None)
    bad_literal = simulate_session_errors(
        rng, ROLLOUTS, BASELINE_ERROR_RATE, BAD_CANDIDATE_ERROR_RATE, literal
    )
    same_literal = simulate_session_errors(
        rng, ROLLOUTS, BASELINE_ERROR_RATE, BASELINE_ERROR_RATE, literal
    )
    at_tolerance = simulate_session_errors(
        rng, ROLLOUTS, BASELINE_ERROR_RATE, BASELINE_ERROR_RATE + spec.tolerance.value
    )
    full_same = simulate_full_metrics(
        rng, full_metric_rollouts, BASELINE_ERROR_RATE, BASELINE_ERROR_RATE
    )
    full_bad = simulate_full_metrics(
        rng, full_metric_rollouts, BASELINE_ERROR_RATE, BAD_CANDIDATE_ERROR_RATE
    )
    rollback = bad.sessions_when(bad.failed)
    promotion = same.sessions_when(same.passed)
    return {
        "assumptions": {
            "rollouts": ROLLOUTS,
            "canary_weight": CANARY_WEIGHT,
            "baseline_sessions_per_look": baseline_per_look(),
            "look_every_candidate_sessions": LOOK_EVERY,
            "cap_candidate_sessions": CAP,
            "candidate_sessions_per_second": ARRIVALS_PER_SECOND,
            "baseline_session_error_rate": BASELINE_ERROR_RATE,
            "bad_candidate_session_error_rate": BAD_CANDIDATE_ERROR_RATE,
            "alpha": config.alpha,
            "mixing_sessions": config.mixing_sessions,
            "min_sessions": config.min_sessions,
            "min_fail_sessions": config.min_fail_sessions,
            "session_error_rate_tolerance": spec.tolerance.value,
            "session_error_rate_fail_margin": spec.margin.value,
            "seed": SEED,
        },
        "rollback_candidate_sessions": rollback,
        "rollback_wall_seconds": _wall(rollback),
        "rollback_rate": float(bad.failed.mean()),
        "bad_candidate_promoted_rate": float(bad.passed.mean()),
        "aa_false_rollback_rate": float(same.failed.mean()),
        "promotion_candidate_sessions": promotion,
        "promotion_wall_seconds": _wall(promotion),
        "aa_promoted_rate": float(same.passed.mean()),
        "at_tolerance_promoted_rate": float(at_tolerance.passed.mean()),
        "fail_margin_equal_to_tolerance": {
            "rollback_candidate_sessions": bad_literal.sessions_when(bad_literal.failed),
            "rollback_rate": float(bad_literal.failed.mean()),
            "aa_false_rollback_rate": float(same_literal.failed.mean()),
        },
        "all_default_metrics": {
            "rollouts": full_metric_rollouts,
            "cap_candidate_sessions": FULL_METRIC_CAP,
            "aa_false_rollback_rate": float(full_same.failed.mean()),
            "aa_promoted_rate": float(full_same.passed.mean()),
            "promotion_candidate_sessions": full_same.sessions_when(full_same.passed),
            "rollback_rate": float(full_bad.failed.mean()),
            "rollback_candidate_sessions": full_bad.sessions_when(full_bad.failed),
        },
        "seconds": round(time.perf_counter() - started, 2),
    }


if __name__ == "__main__":
    print(json.dumps(simulate(), indent=2))
