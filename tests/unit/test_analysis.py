"""The statistics behind rollout analysis and experiments, against simulation: false rollbacks of
identical candidates stay under alpha however often they are looked at, a clearly worse one is
rolled back quickly, intervals cover what they claim, and the boundary and the bounded-score
sequence agree with confseq, the authors' published implementation."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Callable

import numpy as np
import pytest

from bench.rollouts_sim import (
    baseline_per_look,
    first_decision,
    simulate_session_errors,
    synthetic_sessions,
)
from services.telemetry.analysis import (
    DEFAULT_METRICS,
    AnalysisConfig,
    ArmSample,
    Direction,
    MetricSpec,
    Moments,
    NormalMixtureMethod,
    SessionObservation,
    Threshold,
    Verdict,
    analyze_experiment,
    analyze_rollout,
    metric,
    sample_ratio_check,
)
from services.telemetry.analysis.boundary import normal_mixture_bound, optimal_rho, z_multiplier
from services.telemetry.analysis.bounded import (
    BoundedMeanMethod,
    bounded_mean_interval,
    empirical_bernstein_lower,
)
from services.telemetry.analysis.rollout import judge_moments

ALPHA = 0.05
CONFIG = AnalysisConfig()
SESSION_ERRORS = metric("session_error_rate")


def sessions_with_errors(n: int, errors: int) -> list[SessionObservation]:
    return [SessionObservation(invocations=1, failed_invocations=int(i < errors)) for i in range(n)]


def percentile(values: np.ndarray, q: float) -> float:
    return float(np.quantile(values, q, method="inverted_cdf"))


# --- rollouts: the figures the issue sets ---------------------------------------------------


@pytest.mark.parametrize("error_rate", [0.005, 0.02, 0.2])
def test_an_identical_candidate_looked_at_every_10_sessions_is_falsely_rolled_back_at_most_alpha(
    error_rate: float,
) -> None:
    rng = np.random.default_rng(1)
    outcomes = simulate_session_errors(rng, 1000, error_rate, error_rate)
    rate = float(outcomes.failed.mean())
    print(f"A/A at {error_rate:.1%} session errors, 1000 rollouts: false rollback rate {rate:.3f}")
    assert rate <= ALPHA


def test_a_candidate_5_points_worse_on_session_errors_is_rolled_back_quickly() -> None:
    rng = np.random.default_rng(2)
    outcomes = simulate_session_errors(rng, 1000, 0.02, 0.07)
    sessions = outcomes.candidate_sessions[outcomes.failed]
    median, p90 = percentile(sessions, 0.5), percentile(sessions, 0.9)
    print(f"2% -> 7%: rolled back in {outcomes.failed.mean():.1%} of 1000 rollouts, "
          f"median {median:.0f} candidate sessions, p90 {p90:.0f}")
    assert outcomes.failed.mean() >= 0.95
    assert outcomes.passed.mean() <= 0.01
    assert median <= 100
    assert p90 <= 300


def test_an_identical_candidate_is_promoted_within_a_few_hundred_sessions() -> None:
    rng = np.random.default_rng(3)
    outcomes = simulate_session_errors(rng, 1000, 0.02, 0.02)
    sessions = outcomes.candidate_sessions[outcomes.passed]
    median = percentile(sessions, 0.5)
    print(f"A/A: promoted in {outcomes.passed.mean():.1%}, median {median:.0f} candidate sessions")
    assert outcomes.passed.mean() >= 0.9
    assert median <= 400


def test_an_equal_candidate_passes_every_default_metric() -> None:
    rng = np.random.default_rng(4)

    def every_50th_fails(sessions: list[SessionObservation]) -> list[SessionObservation]:
        # Exactly 2% failing sessions in both, so only the other metrics carry sampling noise.
        return [dataclasses.replace(s, failed_invocations=int(i % 50 == 0))
                for i, s in enumerate(sessions)]

    baseline = every_50th_fails(synthetic_sessions(rng, 9000, 0.0))
    candidate = every_50th_fails(synthetic_sessions(rng, 1000, 0.0))
    analysis = analyze_rollout(baseline, candidate)
    assert analysis.verdict is Verdict.PASS, analysis.reason
    assert [c.metric for c in analysis.comparisons] == [m.name for m in DEFAULT_METRICS]
    for c in analysis.comparisons:
        assert c.verdict is Verdict.PASS
        assert c.lower <= c.difference <= c.upper
        assert c.upper < c.tolerance
        assert (c.candidate.sessions, c.baseline.sessions) == (1000, 9000)
        assert c.candidate.invocations == sum(s.invocations for s in candidate)


def test_too_few_sessions_is_inconclusive_never_a_pass() -> None:
    rng = np.random.default_rng(5)
    looks, per_base = 40, baseline_per_look()
    n_c = np.broadcast_to(10.0 * np.arange(1, looks + 1), (2000, looks))
    n_b = n_c * per_base / 10
    # A perfect candidate (no errors at all) is the likeliest to pass early.
    e_c = np.zeros((2000, looks))
    e_b = rng.binomial(per_base, 0.02, (2000, looks)).cumsum(1).astype(np.float64)
    judged = judge_moments(
        SESSION_ERRORS, Moments(n_c, n_c, e_c, n_c, e_c, e_c),
        Moments(n_b, n_b, e_b, n_b, e_b, e_b), CONFIG, binary=True,
    )
    early = n_c[0] < CONFIG.min_sessions
    assert not np.asarray(judged.passed)[:, early].any()
    assert np.asarray(judged.passed)[:, ~early].mean() > 0.5

    analysis = analyze_rollout(sessions_with_errors(1800, 36), sessions_with_errors(199, 0))
    assert analysis.verdict is Verdict.INCONCLUSIVE
    first = analysis.comparisons[0]
    assert first.verdict is Verdict.INCONCLUSIVE
    assert "a pass needs 200 sessions per version (candidate 199, stable 1800)" in first.reason


def test_a_failure_is_called_before_the_minimum_sample_but_not_on_a_handful() -> None:
    baseline = sessions_with_errors(180, 4)
    failing = analyze_rollout(baseline, sessions_with_errors(20, 10), [SESSION_ERRORS])
    assert failing.verdict is Verdict.FAIL
    assert failing.comparisons[0].lower > failing.comparisons[0].fail_margin == 0
    handful = analyze_rollout(baseline, sessions_with_errors(9, 9), [SESSION_ERRORS])
    assert handful.verdict is Verdict.INCONCLUSIVE


def test_the_simulation_judges_exactly_as_analyze_rollout_does() -> None:
    candidate, baseline = sessions_with_errors(240, 11), sessions_with_errors(2160, 40)
    comparison = analyze_rollout(baseline, candidate, [SESSION_ERRORS]).comparisons[0]
    judged = judge_moments(
        SESSION_ERRORS, Moments(240, 240, 11, 240, 11, 11), Moments(2160, 2160, 40, 2160, 40, 40),
        CONFIG, binary=True,
    )
    assert float(judged.lower) == pytest.approx(comparison.lower)
    assert float(judged.upper) == pytest.approx(comparison.upper)
    assert bool(judged.failed) == (comparison.verdict is Verdict.FAIL)


def test_any_failing_metric_fails_the_rollout_and_the_evidence_says_which() -> None:
    rng = np.random.default_rng(6)
    baseline = synthetic_sessions(rng, 1800, 0.02)
    slow = [
        dataclasses.replace(s, latencies_ms=tuple(3 * v for v in s.latencies_ms))
        for s in synthetic_sessions(rng, 200, 0.02)
    ]
    analysis = analyze_rollout(baseline, slow)
    assert analysis.verdict is Verdict.FAIL
    verdicts = {c.metric: c.verdict for c in analysis.comparisons}
    assert verdicts["latency_p95"] is Verdict.FAIL
    assert verdicts["latency_p99"] is Verdict.FAIL
    assert "latency_p95" in analysis.reason
    p95 = next(c for c in analysis.comparisons if c.metric == "latency_p95")
    assert p95.details["candidate_p95_ms"] > 2 * p95.details["baseline_p95_ms"]
    assert p95.baseline.estimate == pytest.approx(0.05, abs=0.002)
    assert p95.lower > p95.fail_margin == p95.tolerance == 0.05


# --- variance: pooled, delta method -----------------------------------------------------------


def test_the_variance_does_not_collapse_when_a_version_has_no_errors() -> None:
    method = NormalMixtureMethod(ALPHA, CONFIG.mixing_sessions)
    candidate = ArmSample.of([0.0] * 300, binary=True)
    baseline = ArmSample.of([0.0] * 2700, binary=True)
    bounds = method.contrast(candidate, baseline, 1.0)
    z = float(z_multiplier(1 / (1 / 300 + 1 / 2700), ALPHA, CONFIG.mixing_sessions))
    p = 1 / 3002  # (errors + 1) / (sessions + 2): a plug-in p(1 - p) would be exactly 0
    floor = z * math.sqrt(p * (1 - p) * (1 / 300 + 1 / 2700))
    assert float(bounds.null_upper) == pytest.approx(floor)
    assert float(bounds.upper) >= floor

    # Zero errors in the candidate against 2% in the baseline: the pooled rate carries the FAIL
    # side, so its width is the pooled binomial one rather than the candidate's empty one.
    baseline = ArmSample.of([1.0] * 54 + [0.0] * 2646, binary=True)
    bounds = method.contrast(candidate, baseline, 1.0)
    pooled = 54 / 3000
    null_half = float(bounds.estimate) - float(bounds.null_lower)
    assert null_half >= z * math.sqrt(pooled * (1 - pooled) * (1 / 300 + 1 / 2700))

    # Thirty sessions without an error do not show a rate within 1 point: a plug-in would pass.
    strict = dataclasses.replace(SESSION_ERRORS, tolerance=Threshold(0.01))
    config = AnalysisConfig(min_sessions=30)
    analysis = analyze_rollout(sessions_with_errors(270, 0), sessions_with_errors(30, 0),
                               [strict], config)
    assert analysis.verdict is Verdict.INCONCLUSIVE


def _clustered_block(
    rng: np.random.Generator, replicates: int, sessions: int, mean_rate: float
) -> Moments:
    """Invocation errors clustered by session: each session has its own failure propensity
    (intra-session correlation 0.2 over about ten invocations)."""
    invocations = 1.0 + rng.poisson(9.0, (replicates, sessions))
    propensity = rng.beta(0.2, 0.2 * (1 - mean_rate) / mean_rate, (replicates, sessions))
    failures = rng.binomial(invocations.astype(np.int64), propensity).astype(np.float64)
    return Moments(
        np.full(replicates, float(sessions)), invocations.sum(1), failures.sum(1),
        np.square(invocations).sum(1), (invocations * failures).sum(1), np.square(failures).sum(1),
    )


def test_the_delta_method_over_sessions_matches_a_direct_simulation() -> None:
    rng = np.random.default_rng(7)
    method = NormalMixtureMethod(ALPHA, CONFIG.mixing_sessions)
    replicates = 2000
    for name, (rate_c, rate_b) in {"same": (0.05, 0.05), "worse": (0.08, 0.05)}.items():
        truth = rate_c - rate_b
        cand, base = _clustered_block(rng, replicates, 20, rate_c), _clustered_block(
            rng, replicates, 180, rate_b
        )
        bounds = method.contrast_moments(cand, base, 1.0, binary=True)
        false_fail = np.zeros(replicates, dtype=np.bool_)
        covered = np.ones(replicates, dtype=np.bool_)
        for look in range(1, 21):  # 20 to 400 candidate sessions, 9x as many baseline ones
            if look > 1:
                cand = cand + _clustered_block(rng, replicates, 20, rate_c)
                base = base + _clustered_block(rng, replicates, 180, rate_b)
            bounds = method.contrast_moments(cand, base, 1.0, binary=True)
            false_fail |= np.asarray(bounds.null_lower) > 0
            if 20 * look >= CONFIG.min_sessions:  # where a pass may be read
                covered &= (np.asarray(bounds.lower) <= truth) & (truth <= np.asarray(bounds.upper))
        estimate = np.asarray(bounds.estimate)
        z = np.asarray(z_multiplier(1 / (1 / 400 + 1 / 3600), ALPHA, CONFIG.mixing_sessions))
        delta_se = float(np.mean((np.asarray(bounds.upper) - estimate) / z))
        empirical_sd = float(np.std(estimate))
        p_c, p_b = cand.ratio(), base.ratio()
        naive_se = float(np.mean(np.sqrt(
            p_c * (1 - p_c) / np.asarray(cand.sx) + p_b * (1 - p_b) / np.asarray(base.sx)
        )))
        print(f"{name}: delta-method SE {delta_se:.4f}, simulated SD {empirical_sd:.4f}, "
              f"per-invocation SE {naive_se:.4f}, coverage from 200 sessions {covered.mean():.3f}"
              f", ever-failed (pooled, A/A only meaningful) {false_fail.mean():.3f}")
        assert delta_se == pytest.approx(empirical_sd, rel=0.1)
        assert empirical_sd > 1.5 * naive_se  # invocations of one session are not independent
        assert covered.mean() >= 1 - ALPHA
        if name == "same":
            assert false_fail.mean() <= ALPHA


# --- scores: bounded confidence sequences -----------------------------------------------------


def test_the_bounded_score_sequence_covers_the_mean_at_every_sample_size() -> None:
    rng = np.random.default_rng(8)
    covered = 0
    for _ in range(400):
        values = rng.beta(8.0, 2.0, 300)  # mean 0.8
        lower = empirical_bernstein_lower(values, ALPHA / 2)
        upper = 1 - empirical_bernstein_lower(1 - values, ALPHA / 2)
        covered += bool(np.all((lower <= 0.8) & (0.8 <= upper)))
    print(f"bounded score sequence: time-uniform coverage {covered / 400:.3f}")
    assert covered / 400 >= 1 - ALPHA
    lower_5, upper_5 = bounded_mean_interval(np.array([1.0, 1.0, 1.0, 1.0, 1.0]), ALPHA)
    assert 0.0 <= lower_5 <= upper_5 == 1.0


def test_the_bounded_contrast_covers_the_difference() -> None:
    rng = np.random.default_rng(9)
    method = BoundedMeanMethod(ALPHA)
    covered = 0
    for _ in range(200):
        cand = ArmSample.of(list(rng.beta(6.0, 4.0, 100)))  # mean 0.6
        base = ArmSample.of(list(rng.beta(8.0, 2.0, 900)))  # mean 0.8
        bounds = method.contrast(cand, base, 1.0)
        covered += float(bounds.lower) <= -0.2 <= float(bounds.upper)
    assert covered / 200 >= 1 - ALPHA


def test_the_bounded_sequence_matches_confseq_predmix_empirical_bernstein() -> None:
    # confseq 0.0.11 predmix_empbern_twosided_cs(x, alpha=0.05, truncation=0.5,
    # running_intersection=True) on x_i = frac(i * 0.618...)², i = 1..200.
    values = ((np.arange(1, 201) * 0.6180339887498949) % 1.0) ** 2
    reference = {
        25: (0.0065516629025684225, 0.681711458040454),
        50: (0.14712016940001, 0.5115735617703572),
        100: (0.22282979644846584, 0.44200102769305394),
        200: (0.26091614244311656, 0.40689373878557245),
    }
    for n, (lower, upper) in reference.items():
        assert bounded_mean_interval(values[:n], 0.05) == pytest.approx((lower, upper), rel=1e-9)


def test_scores_higher_is_better_fail_when_lower_and_pass_when_equal() -> None:
    rng = np.random.default_rng(10)

    def scored(n: int, a: float, b: float) -> list[SessionObservation]:
        return [SessionObservation(scores={"accuracy": float(v)}) for v in rng.beta(a, b, n)]

    spec = metric("score:accuracy")
    assert spec.direction is Direction.HIGHER_IS_BETTER
    worse = analyze_rollout(scored(1800, 8, 2), scored(200, 6, 4), [spec]).comparisons[0]
    assert worse.verdict is Verdict.FAIL
    assert worse.difference < 0
    assert worse.upper < -worse.fail_margin == -0.05  # worse means lower here
    same = analyze_rollout(scored(9000, 8, 2), scored(1000, 8, 2), [spec]).comparisons[0]
    assert same.verdict is Verdict.PASS, same.reason
    assert same.lower > -same.tolerance
    unscored = analyze_rollout(scored(1800, 8, 2), sessions_with_errors(200, 0), [spec])
    assert unscored.verdict is Verdict.INCONCLUSIVE
    assert "no score:accuracy values for the candidate yet" in unscored.comparisons[0].reason


def test_higher_is_better_flips_a_ratio_metric() -> None:
    # A success rate: more is better, so a drop is the degradation.
    spec = MetricSpec("session_error_rate", Direction.HIGHER_IS_BETTER, Threshold(0.03),
                      Threshold(0.0))
    dropped = analyze_rollout(sessions_with_errors(1800, 1700), sessions_with_errors(200, 150),
                              [spec]).comparisons[0]
    assert dropped.verdict is Verdict.FAIL
    assert dropped.upper < 0
    risen = analyze_rollout(sessions_with_errors(1800, 1700), sessions_with_errors(200, 198),
                            [spec]).comparisons[0]
    assert risen.verdict is Verdict.PASS


# --- thresholds -------------------------------------------------------------------------------


def test_a_relative_tolerance_is_a_fraction_of_the_baseline() -> None:
    rng = np.random.default_rng(11)

    def with_tokens(n: int, mean: float) -> list[SessionObservation]:
        return [SessionObservation(tokens=int(v)) for v in rng.gamma(4.0, mean / 4.0, n)]

    spec = metric("tokens_per_session")
    assert spec.tolerance == Threshold(0.25, relative=True)
    baseline = with_tokens(3600, 1000.0)
    slightly = analyze_rollout(baseline, with_tokens(400, 1050.0), [spec]).comparisons[0]
    assert slightly.verdict is Verdict.PASS
    assert slightly.tolerance == pytest.approx(0.25 * slightly.baseline.estimate)
    assert slightly.upper < slightly.tolerance
    much = analyze_rollout(baseline, with_tokens(400, 1600.0), [spec]).comparisons[0]
    assert much.verdict is Verdict.FAIL
    assert much.lower > much.fail_margin == pytest.approx(0.25 * much.baseline.estimate)
    between = analyze_rollout(baseline, with_tokens(400, 1250.0), [spec]).comparisons[0]
    assert between.verdict is Verdict.INCONCLUSIVE


def test_the_fail_margin_defaults_to_the_tolerance_except_for_session_errors() -> None:
    assert SESSION_ERRORS.margin == Threshold(0.0)
    assert metric("latency_p95").margin == metric("latency_p95").tolerance
    assert metric("score:x", tolerance=0.1, fail_margin=0.02).margin == Threshold(0.02)


# --- the boundary against its published implementation ----------------------------------------

# confseq 0.0.11 normal_mixture_bound(v, alpha, v_opt, alpha_opt=alpha, is_one_sided=False),
# compiled from its uniform_boundaries.h: (alpha, v_opt, v) -> u(v).
CONFSEQ_TWO_SIDED = {
    (0.05, 10.0, 1.0): 3.855054633530,
    (0.05, 10.0, 100.0): 32.417231454054,
    (0.05, 100.0, 10.0): 12.190753146341,
    (0.05, 100.0, 1000.0): 102.512286831664,
    (0.01, 10.0, 1000.0): 127.576460109222,
    (0.01, 100.0, 100.0): 35.716299708704,
}


def test_the_normal_mixture_boundary_matches_confseq_and_the_closed_form() -> None:
    for (alpha, v_opt, v), expected in CONFSEQ_TWO_SIDED.items():
        assert float(normal_mixture_bound(v, alpha, v_opt)) == pytest.approx(expected, rel=1e-10)
        # Howard et al. (2021), the two-sided normal mixture boundary
        # u(v) = sqrt((v + ρ) log((v + ρ) / (ρ α²))), with confseq's choice of ρ:
        # ρ = v_opt / (2 log(1/α) + log(1 + 2 log(1/α))).
        rho = v_opt / (2 * math.log(1 / alpha) + math.log(1 + 2 * math.log(1 / alpha)))
        assert optimal_rho(v_opt, alpha) == pytest.approx(rho)
        closed = math.sqrt((v + rho) * math.log((v + rho) / (rho * alpha**2)))
        assert float(normal_mixture_bound(v, alpha, v_opt)) == pytest.approx(closed)
    # The confidence sequence is tightest (in standard errors per √n) around the mixing size.
    n = np.arange(1.0, 2001.0)
    per_n = np.asarray(z_multiplier(n, ALPHA, 100.0)) / np.sqrt(n)
    assert float(np.asarray(z_multiplier(100.0, ALPHA, 100.0))) < 3.2
    assert np.all(np.diff(per_n) < 0)  # still narrows as sessions accumulate


@pytest.mark.skipif(
    importlib.util.find_spec("confseq") is None,
    reason="confseq is not installed (its sdist needs a C++ compiler and Boost); the constants "
    "in CONFSEQ_TWO_SIDED above were computed with it",
)
def test_the_boundary_matches_an_installed_confseq() -> None:
    from confseq.boundaries import (  # pyright: ignore[reportMissingImports]
        normal_mixture_bound as reference,  # pyright: ignore[reportUnknownVariableType]
    )

    for alpha, v_opt, v in CONFSEQ_TWO_SIDED:
        expected = float(reference(v, alpha, v_opt, alpha, False))  # pyright: ignore
        assert float(normal_mixture_bound(v, alpha, v_opt)) == pytest.approx(expected, rel=1e-10)


# --- experiments ------------------------------------------------------------------------------


def test_the_sample_ratio_check_fires_on_55_45_against_50_50_and_not_on_a_fair_split() -> None:
    broken = sample_ratio_check({"2": 5500, "3": 4500}, {"2": 50, "3": 50})
    assert broken.mismatch and broken.p_value < 1e-20
    fair = sample_ratio_check({"2": 5040, "3": 4960}, {"2": 50, "3": 50})
    assert not fair.mismatch and fair.p_value > 0.001
    assert not sample_ratio_check({"2": 7990, "3": 2010}, {"2": 80, "3": 20}).mismatch
    assert not sample_ratio_check({"2": 0, "3": 0}, {"2": 80, "3": 20}).mismatch


def test_an_experiment_reports_means_and_effects_with_always_valid_intervals() -> None:
    variants = {"2": sessions_with_errors(8000, 160), "3": sessions_with_errors(2000, 120)}
    analysis = analyze_experiment(variants, {"2": 80, "3": 20}, control="2",
                                  metrics=[SESSION_ERRORS])
    assert analysis.winner_allowed and analysis.warning == ""
    control, treatment = analysis.metrics[0].variants
    assert (control.variant, control.sessions, control.effect) == ("2", 8000, None)
    assert control.lower < 0.02 < control.upper
    assert treatment.lower < 0.06 < treatment.upper
    assert treatment.effect == pytest.approx(0.04)
    assert treatment.effect_lower is not None and treatment.effect_upper is not None
    assert 0 < treatment.effect_lower < 0.04 < treatment.effect_upper


def test_an_experiment_with_a_sample_ratio_mismatch_names_no_winner() -> None:
    variants = {"2": sessions_with_errors(5500, 110), "3": sessions_with_errors(4500, 90)}
    analysis = analyze_experiment(variants, {"2": 50, "3": 50}, control="2",
                                  metrics=[SESSION_ERRORS])
    assert not analysis.winner_allowed
    assert "sample ratio mismatch" in analysis.warning
    assert "no winner can be named" in analysis.warning


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: metric("latency_p50"), "unknown metric 'latency_p50'"),
        (lambda: metric("score:"), "unknown metric 'score:'"),
        (lambda: metric("session_error_rate", tolerance=-0.01), "must be a finite number >= 0"),
        (lambda: metric("latency_p95", tolerance=0.01, fail_margin=0.02), "exceeds tolerance"),
        (lambda: SessionObservation(invocations=1, failed_invocations=2), "exceeds invocations"),
        (lambda: SessionObservation(scores={"a": 1.5}), "score 'a' must be in [0, 1]"),
        (lambda: AnalysisConfig(alpha=0), "alpha must be between 0 and 1"),
        (lambda: analyze_rollout([], [], []), "at least one metric"),
        (lambda: analyze_rollout([], [], [SESSION_ERRORS, SESSION_ERRORS]), "more than once"),
        (lambda: sample_ratio_check({"2": 1}, {"2": 50, "3": 50}), "differ from the split"),
        (lambda: analyze_experiment({"2": []}, {"2": 100}, control="3"), "control '3'"),
    ],
)
def test_bad_input_is_refused_with_a_message_naming_the_problem(
    build: Callable[[], object], words: str
) -> None:
    with pytest.raises(ValueError) as caught:
        build()
    assert words in str(caught.value)


def test_first_decision_counts_undecided_rollouts_as_neither() -> None:
    failed = np.array([[False, True], [False, False]])
    passed = np.array([[True, False], [False, False]])
    outcomes = first_decision(failed, passed, 10)
    assert outcomes.failed.tolist() == [False, False]
    assert outcomes.passed.tolist() == [True, False]
    assert outcomes.candidate_sessions.tolist() == [10, 20]
