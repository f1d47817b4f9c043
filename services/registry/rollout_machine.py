"""The rollout state machine's explicit actions, pure: what pause, resume and promote do to a
rollout's state, step and reason. Only a passing analysis (the controller) or a human's promote
moves a rollout past an analysis gate; resume continues at the step the rollout was held at."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from services.common.errors import FailedPrecondition
from services.registry.rollout_model import ManualGate, RolloutRecord, RolloutState, SetWeight


def check_active(r: RolloutRecord) -> None:
    """An ended rollout takes no action: a new one has to be started."""
    if not r.active:
        raise FailedPrecondition(
            f"{r.name} has already ended ({r.state.value.lower()}); start a new rollout",
            reason="ROLLOUT_ENDED",
        )


def paused(r: RolloutRecord, reason: str) -> RolloutRecord:
    """Held at its step and weight; the controller leaves a paused rollout alone."""
    return replace(r, state=RolloutState.PAUSED, state_reason=reason)


def resume_step(r: RolloutRecord) -> int:
    """The step a resumed rollout continues at: the one it was held at. A manual gate waits for
    exactly this, so resuming passes it; an analysis gate is evaluated again and has to pass."""
    steps, step = r.spec.steps, r.current_step
    if step < len(steps) and isinstance(steps[step], ManualGate):
        return step + 1
    return step


def resumed(r: RolloutRecord, actor: str, now: datetime) -> RolloutRecord:
    """Progressing again from where it was held; the step's time starts over (a pause waits its
    length, a gate gets its maximum duration again; the analysis still covers every session since
    the candidate first got traffic)."""
    if r.state is not RolloutState.PAUSED:
        raise FailedPrecondition(
            f"{r.name} is {r.state.value.lower()}, not paused: there is nothing to resume",
            reason="NOT_PAUSED",
        )
    return replace(r, state=RolloutState.PROGRESSING, state_reason=f"resumed by {actor}",
                   current_step=resume_step(r), step_start_time=now)


def promote_step(r: RolloutRecord) -> int:
    """The step after the current gate or pause (the current step when it sets a weight: that
    weight is applied next)."""
    steps, step = r.spec.steps, r.current_step
    if step < len(steps) and not isinstance(steps[step], SetWeight):
        return step + 1
    return step


def promoted(r: RolloutRecord, actor: str, now: datetime) -> RolloutRecord:
    """A human's promote: past the current gate or pause, progressing (also when it was paused)."""
    return replace(r, state=RolloutState.PROGRESSING,
                   state_reason=f"promoted past step {r.current_step} by {actor}",
                   current_step=promote_step(r), step_start_time=now)
