"""The rollout state machine with real registry and telemetry servers on real PostgreSQL: a
rollout held at a pending analysis gate and resumed still waits for the analysis to pass."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from corral.registry.v1 import rollouts_pb2 as ro
from corral.telemetry.v1 import telemetry_pb2 as tel
from tests.conftest import StartServices
from tests.rollout_world import ALICE, World, analysis, gate, ready, state, weight

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_a_paused_and_resumed_gate_still_waits_for_the_analysis_to_pass(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    """The issue: paused at a gate that had 16 of the 100 sessions it needed, then resumed, a
    canary went straight to 100%."""
    await start_services("telemetry", "registry")
    w = await ready(make_world)
    r = await w.start_rollout(2, [weight(10), gate(600), weight(100)], analysis(100))
    await w.wait(r.name, lambda x: x.current_step == 1, what="at its analysis gate")
    await w.send_sessions(1, 16)
    await w.send_sessions(2, 16)
    await w.wait(r.name, lambda x: x.last_analysis.comparisons[0].candidate.sessions == 16
                 if x.last_analysis.comparisons else False, what="analysed with 16 sessions")

    await w.rollouts.PauseRollout(ro.PauseRolloutRequest(name=r.name), metadata=ALICE)
    resumed = await w.rollouts.ResumeRollout(ro.ResumeRolloutRequest(name=r.name), metadata=ALICE)
    assert state(resumed) == "PROGRESSING" and resumed.current_step == 1, resumed
    await asyncio.sleep(2.5)  # controller ticks and analyses: still inconclusive
    held = await w.rollout(r.name)
    assert (state(held), held.current_step, held.current_weight) == ("PROGRESSING", 1, 10), held
    assert held.last_analysis.verdict == tel.VERDICT_INCONCLUSIVE
    assert sorted(await w.traffic()) == [(w.version(1), 90.0), (w.version(2), 10.0)]

    # Enough sessions, both versions alike: the gate passes and only then the weight moves.
    await w.send_sessions(1, 200)
    await w.send_sessions(2, 200)
    done = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="finished")
    assert state(done) == "SUCCEEDED", done.state_reason
    assert await w.traffic() == [(w.version(2), 100.0)]
    methods = [m for m, _ in await w.rollout_events(r.name)]
    assert methods[methods.index("ResumeRollout"):] == [
        "ResumeRollout", "Rollout:ANALYSIS_PASSED", "Rollout:SUCCEEDED"], methods
