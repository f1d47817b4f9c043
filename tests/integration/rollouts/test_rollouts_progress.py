"""Rollouts with real registry and telemetry servers on real PostgreSQL, moving through their
steps: promotion through every step, an inconclusive pause that a resume does not pass, and a
registry restarted or replicated mid-rollout applying each step once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from corral.registry.v1 import rollouts_pb2 as ro
from corral.registry.v1 import rollouts_pb2_grpc
from corral.telemetry.v1 import telemetry_pb2 as tel
from services.common.server import ServiceHost
from services.registry.controller import RolloutController
from tests import harness
from tests.conftest import StartServices
from tests.rollout_world import ALICE, World, analysis, gate, pause, ready, state, weight

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


# -- 1. promotion ------------------------------------------------------------------------------


async def test_equal_candidate_is_promoted_through_every_step(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world)
    before = (await w.get_endpoint()).revision
    steps = [weight(20), gate(30), weight(60), gate(30), weight(100)]
    r = await w.start_rollout(2, steps, analysis(20))
    assert state(r) == "PROGRESSING" and r.stable_version == w.version(1)

    await w.wait(r.name, lambda x: x.current_weight == 20, what="at 20%")
    assert sorted(await w.traffic()) == [(w.version(1), 80.0), (w.version(2), 20.0)]
    # Both versions serve the same way: no failures, the same latencies (default metrics).
    await w.send_sessions(1, 200)
    await w.send_sessions(2, 200)

    done = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="finished")
    assert state(done) == "SUCCEEDED", done.state_reason
    assert done.current_weight == 100 and done.current_step == len(steps)
    assert done.last_analysis.verdict == tel.VERDICT_PASS
    assert {c.metric.name for c in done.last_analysis.comparisons} >= {"session_error_rate"}
    assert all(c.candidate.sessions == 200 and c.baseline.sessions == 200 for c in done.last_analysis.comparisons)
    assert await w.traffic() == [(w.version(2), 100.0)]

    events = await w.rollout_events(r.name)
    assert events == [
        ("CreateRollout", -1),
        ("Rollout:WEIGHT_SET", 0), ("Rollout:ANALYSIS_PASSED", 1),
        ("Rollout:WEIGHT_SET", 2), ("Rollout:ANALYSIS_PASSED", 3),
        ("Rollout:SUCCEEDED", 4),
    ], events
    # One endpoint revision per weight step (20, 60, 100), no more.
    assert (await w.get_endpoint()).revision == before + 3


# -- 2. inconclusive ---------------------------------------------------------------------------


async def test_no_traffic_pauses_as_inconclusive_and_never_promotes(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world)
    r = await w.start_rollout(2, [weight(10), gate(2), weight(100)], analysis(20))
    t0 = time.monotonic()
    paused = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="paused")
    assert state(paused) == "PAUSED", paused.state_reason
    assert "inconclusive" in paused.state_reason, paused.state_reason
    assert time.monotonic() - t0 >= 1.5  # not before the gate's maximum duration
    assert paused.current_step == 1 and paused.current_weight == 10
    assert paused.last_analysis.verdict == tel.VERDICT_INCONCLUSIVE

    await asyncio.sleep(1.5)  # several controller ticks: still paused, still at 10%
    still = await w.rollout(r.name)
    assert state(still) == "PAUSED" and still.current_weight == 10
    assert sorted(await w.traffic()) == [(w.version(1), 90.0), (w.version(2), 10.0)]
    events = await w.rollout_events(r.name)
    assert [m for m, _ in events].count("Rollout:PAUSED") == 1
    assert "Rollout:ANALYSIS_PASSED" not in [m for m, _ in events]

    # Resumed, it is back at the gate, which has to pass: still no traffic, so it pauses again.
    resumed = await w.rollouts.ResumeRollout(ro.ResumeRolloutRequest(name=r.name), metadata=ALICE)
    assert state(resumed) == "PROGRESSING" and resumed.current_step == 1
    again = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="paused again")
    assert state(again) == "PAUSED" and "inconclusive" in again.state_reason, again.state_reason
    assert again.current_weight == 10 and sorted(await w.traffic()) == [(w.version(1), 90.0), (w.version(2), 10.0)]
    # Only a human's promote takes it past the gate.
    await w.rollouts.PromoteRollout(ro.PromoteRolloutRequest(name=r.name), metadata=ALICE)
    done = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="finished")
    assert state(done) == "SUCCEEDED" and await w.traffic() == [(w.version(2), 100.0)]
    assert [m for m, _ in await w.rollout_events(r.name)][-4:] == [
        "ResumeRollout", "Rollout:PAUSED", "PromoteRollout", "Rollout:SUCCEEDED"]


# -- 3. a registry restarted mid-rollout -------------------------------------------------------


async def test_registry_restarted_mid_rollout_resumes_without_repeating_a_step(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry")
    first = (await start_services("registry"))["registry"]
    second: ServiceHost | None = None
    try:
        w = await ready(make_world)
        before = (await w.get_endpoint()).revision
        steps = [weight(10), pause(2), weight(50), pause(2), weight(100)]
        r = await w.start_rollout(2, steps)
        await w.wait(r.name, lambda x: x.current_step == 1, what="in its first pause")
        await first.stop(grace=0.2)
        await asyncio.sleep(2.5)  # the pause runs out while no registry is up
        second = await harness.restart(first)
        done = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="finished")
        assert state(done) == "SUCCEEDED", done.state_reason
        assert await w.traffic() == [(w.version(2), 100.0)]
        events = await w.rollout_events(r.name)
        assert events == [("CreateRollout", -1), ("Rollout:WEIGHT_SET", 0), ("Rollout:WEIGHT_SET", 2),
                          ("Rollout:SUCCEEDED", 4)], events
        assert (await w.get_endpoint()).revision == before + 3  # 10%, 50%, 100%: once each
    finally:
        await first.stop(grace=0.2)
        if second is not None:
            await second.stop(grace=0.2)


# -- 4. two replicas ---------------------------------------------------------------------------


async def test_two_registry_replicas_apply_each_step_once(
    start_services: StartServices, services: harness.Platform, make_world: Callable[..., World],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world)
    replica = await harness.start_service("registry", services.settings)
    drivers: set[int] = set()
    advance = RolloutController.advance

    async def spy(self: RolloutController, seen: Any) -> Any:
        if seen.agent == w.agent:
            drivers.add(id(self))
        return await advance(self, seen)

    monkeypatch.setattr(RolloutController, "advance", spy)
    try:
        before = (await w.get_endpoint()).revision
        steps = [weight(10), pause(1), weight(30), pause(1), weight(60), pause(1), weight(100)]
        r = await w.start_rollout(2, steps)
        # Both replicas serve the rollout API over the same database.
        via_replica = rollouts_pb2_grpc.RolloutServiceStub(w.channel("registry", replica.address))
        seen = await via_replica.GetRollout(ro.GetRolloutRequest(name=r.name))
        assert seen.name == r.name
        done = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="finished")
        assert state(done) == "SUCCEEDED", done.state_reason
        events = await w.rollout_events(r.name)
        assert events == [("CreateRollout", -1), ("Rollout:WEIGHT_SET", 0), ("Rollout:WEIGHT_SET", 2),
                          ("Rollout:WEIGHT_SET", 4), ("Rollout:SUCCEEDED", 6)], events
        assert (await w.get_endpoint()).revision == before + 4
        assert await w.traffic() == [(w.version(2), 100.0)]
        assert len(drivers) == 2, "both replicas' controllers should have contended for the rollout"
    finally:
        await replica.stop(grace=0.2)
