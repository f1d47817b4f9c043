"""The rule that keeps a window with missing spans from passing: drops meeting the window and
backlogs starting before its end make PASS inconclusive, with a reason naming them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.telemetry import gaps
from services.telemetry.analysis import (
    ExperimentAnalysis,
    RolloutAnalysis,
    SampleRatioCheck,
    Verdict,
)
from services.telemetry.gaps import Backlog, DroppedSpans

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
END = T0 + timedelta(minutes=10)
NOW = END + timedelta(seconds=5)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_nothing_reported_means_nothing_missing() -> None:
    assert gaps.missing_data(T0, END, [], [], NOW) == ""


def test_a_drop_inside_the_window_is_missing_data_naming_the_executor_and_count() -> None:
    reason = gaps.missing_data(T0, END, [], [DroppedSpans("executor-a", at(2), at(3), 40)], NOW)
    assert "40 spans dropped by executor-a" in reason
    assert at(2).isoformat(timespec="milliseconds") in reason


def test_drops_outside_the_window_do_not_count_those_meeting_it_do() -> None:
    before = DroppedSpans("a", at(-5), at(-1), 1)
    after = DroppedSpans("a", END, at(12), 1)
    straddling = DroppedSpans("b", at(-1), at(1), 3)
    assert gaps.missing_data(T0, END, [], [before, after], NOW) == ""
    assert "3 spans dropped by b" in gaps.missing_data(T0, END, [], [before, straddling], NOW)


def test_a_backlog_starting_before_the_end_is_missing_data() -> None:
    reason = gaps.missing_data(T0, END, [Backlog("executor-b", at(9), NOW)], [], NOW)
    assert "not yet delivered by executor-b" in reason
    # Held spans all started after the window: nothing of it is missing.
    assert gaps.missing_data(T0, END, [Backlog("executor-b", END, NOW)], [], NOW) == ""
    # Started before the window: later ones may be in it.
    assert gaps.missing_data(T0, END, [Backlog("executor-b", at(-30), NOW)], [], NOW) != ""


def test_a_backlog_not_reported_on_for_long_is_forgotten() -> None:
    """Its executor is gone: it must not hold every analysis for ever."""
    later = NOW + gaps.BACKLOG_EXPIRY
    backlog = Backlog("executor-b", at(9), NOW)
    assert gaps.missing_data(T0, END, [backlog], [], later) != ""
    assert gaps.missing_data(T0, END, [backlog], [], later + timedelta(seconds=1)) == ""


def test_many_exporters_are_named_up_to_three() -> None:
    drops = [DroppedSpans(f"e{i}", at(1), at(2), 1) for i in range(5)]
    assert "5 spans dropped by e0, e1, e2 and 2 more" in gaps.missing_data(T0, END, [], drops, NOW)


def rollout(verdict: Verdict) -> RolloutAnalysis:
    return RolloutAnalysis(verdict, "as analysed", (), 0.05)


def test_a_pass_with_missing_data_is_inconclusive_with_the_reason() -> None:
    held = gaps.hold_rollout(rollout(Verdict.PASS), "3 spans dropped by a")
    assert held.verdict is Verdict.INCONCLUSIVE
    assert held.reason == "missing data: 3 spans dropped by a"
    assert held.missing_data == "3 spans dropped by a"


def test_a_fail_stays_a_fail_and_an_inconclusive_stays_with_the_reason_added() -> None:
    failed = gaps.hold_rollout(rollout(Verdict.FAIL), "x")
    assert failed.verdict is Verdict.FAIL and failed.reason == "as analysed; missing data: x"
    waiting = gaps.hold_rollout(rollout(Verdict.INCONCLUSIVE), "x")
    assert waiting.verdict is Verdict.INCONCLUSIVE and waiting.missing_data == "x"


def test_no_missing_data_leaves_the_verdict_alone() -> None:
    assert gaps.hold_rollout(rollout(Verdict.PASS), "") == rollout(Verdict.PASS)


def test_an_experiment_with_missing_data_names_no_winner_and_says_why() -> None:
    balanced = SampleRatioCheck({"v1": 100, "v2": 100}, {"v1": 0.5, "v2": 0.5}, 0.0, 1.0, False)
    result = ExperimentAnalysis("v1", balanced, (), 0.05)
    assert result.winner_allowed and result.warning == ""
    held = gaps.hold_experiment(result, "3 spans dropped by a")
    assert not held.winner_allowed
    assert held.warning == "missing data: 3 spans dropped by a; no winner can be named until it arrives"
