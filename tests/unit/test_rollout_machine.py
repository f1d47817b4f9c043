"""The rollout state machine's explicit actions as pure rules: where resume and promote leave a
rollout held at each kind of step, and what an ended or progressing rollout refuses."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from corral.names import AgentRef
from services.common.errors import FailedPrecondition
from services.registry import rollout_machine
from services.registry import rollout_model as ro
from services.registry.rollout_rules import rollout_spec

pytestmark = pytest.mark.timeout(20)

AGENT = AgentRef("support")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)
# Held at step 1, which is each kind of step in turn; weight 10 before it.
HELD_AT: dict[str, ro.Step] = {
    "analysis gate": ro.AnalysisGate(600),
    "manual gate": ro.ManualGate(),
    "pause": ro.Pause(60),
    "weight": ro.SetWeight(50),
}


def held_at(step: ro.Step, state: ro.RolloutState = ro.RolloutState.PAUSED) -> ro.RolloutRecord:
    steps = (ro.SetWeight(10), step, ro.SetWeight(100))
    spec = rollout_spec(ro.RolloutRequest(AGENT.version(2), steps=steps))
    return ro.RolloutRecord(
        tenant="acme", endpoint=AGENT.endpoint("prod"), id=1, spec=spec, state=state,
        state_reason="", traffic_start_time=T0, end_time=None, create_time=T0, update_time=T0,
        creator="alice", revision=3, stable_version=1, candidate_version=2, current_step=1,
        current_weight=10.0, last_analysis=None, last_check_time=T0, step_start_time=T0,
    )


# Resume continues at the step it was held at; only a manual gate (waiting for it) is passed.
@pytest.mark.parametrize(("kind", "step"), [
    ("analysis gate", 1), ("manual gate", 2), ("pause", 1), ("weight", 1),
])
def test_resume_continues_where_the_rollout_was_held(kind: str, step: int) -> None:
    resumed = rollout_machine.resumed(held_at(HELD_AT[kind]), "alice", NOW)
    assert (resumed.state, resumed.current_step) == (ro.RolloutState.PROGRESSING, step)
    assert resumed.current_weight == 10 and resumed.state_reason == "resumed by alice"
    assert resumed.step_start_time == NOW  # a pause waits its length, a gate its maximum, again


# Promote, a human's decision, passes any gate or pause; a weight step is applied next anyway.
@pytest.mark.parametrize(("kind", "step"), [
    ("analysis gate", 2), ("manual gate", 2), ("pause", 2), ("weight", 1),
])
@pytest.mark.parametrize("state", [ro.RolloutState.PAUSED, ro.RolloutState.PROGRESSING])
def test_promote_passes_the_current_gate_or_pause(kind: str, step: int, state: ro.RolloutState) -> None:
    promoted = rollout_machine.promoted(held_at(HELD_AT[kind], state), "bob", NOW)
    assert (promoted.state, promoted.current_step) == (ro.RolloutState.PROGRESSING, step)
    assert promoted.state_reason == "promoted past step 1 by bob" and promoted.current_weight == 10


def test_pause_holds_the_step_and_weight() -> None:
    for step in HELD_AT.values():
        progressing = held_at(step, ro.RolloutState.PROGRESSING)
        paused = rollout_machine.paused(progressing, "paused by alice")
        assert paused == replace(progressing, state=ro.RolloutState.PAUSED, state_reason="paused by alice")


def test_a_progressing_rollout_is_not_resumed() -> None:
    with pytest.raises(FailedPrecondition) as err:
        rollout_machine.resumed(held_at(ro.AnalysisGate(600), ro.RolloutState.PROGRESSING), "alice", NOW)
    assert err.value.reason == "NOT_PAUSED" and "is progressing, not paused: there is nothing to resume" in err.value.message


@pytest.mark.parametrize("state", list(ro.RolloutState))
def test_only_a_running_rollout_takes_an_action(state: ro.RolloutState) -> None:
    r = held_at(ro.AnalysisGate(600), state)
    if state in (ro.RolloutState.PROGRESSING, ro.RolloutState.PAUSED):
        rollout_machine.check_active(r)
        return
    with pytest.raises(FailedPrecondition) as err:
        rollout_machine.check_active(r)
    assert err.value.reason == "ROLLOUT_ENDED"
    assert f"has already ended ({state.value.lower()}); start a new rollout" in err.value.message
