"""Rollouts, their controller and experiments against in-memory fakes and a hand-driven clock: each
step, analysis verdict, session policy and conclusion, without sockets or a database."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from corral.names import AgentRef, VersionRef
from services.common.endpoints import TrafficShare
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.identity import Caller
from services.common.metric_spec import Direction
from services.registry import rollout_model as ro
from services.registry.experiments import recommend
from services.registry.model import EndpointChange
from tests.bundles import packed_agent
from tests.fakes.registry import REGISTRY_TENANT, RegistryWorld, registry_world

pytestmark = pytest.mark.timeout(20)

ALICE = Caller(REGISTRY_TENANT, "alice")
AGENT = AgentRef("support")
PROD = AGENT.endpoint("prod")


@pytest.fixture
async def world(tmp_path: Path) -> RegistryWorld:
    """Three versions of the agent, and prod serving the first alone."""
    w = registry_world()
    for i in range(3):
        data = packed_agent(tmp_path, AGENT.agent, "app = None\n", prompt=f"v{i}\n")
        await w.registry.publish(ALICE, None, data, "", "")
    only_v1 = EndpointChange((ro.TrafficTarget(AGENT.version(1), 100),), None)
    await w.registry.set_endpoint(ALICE, PROD, only_v1, allow_missing=True)
    return w


async def start(w: RegistryWorld, *steps: ro.Step, policy: ro.SessionPolicy | None = None) -> ro.RolloutRecord:
    request = ro.RolloutRequest(AGENT.version(2), steps=steps, rollback_policy=policy)
    return await w.rollouts.create(ALICE, PROD, request)


async def serving(w: RegistryWorld) -> tuple[TrafficShare, ...]:
    return (await w.registry.get_endpoint(ALICE, PROD)).traffic


def comparison(name: str, verdict: ro.Verdict, explanation: str = "") -> ro.Comparison:
    return ro.Comparison(ro.MetricSpec(name), None, None, 0.1, 0.05, 0.2, 0.0, verdict, explanation)


# -- creating ----------------------------------------------------------------------------------


async def test_a_rollout_needs_one_stable_version_and_no_other_run(world: RegistryWorld) -> None:
    with pytest.raises(FailedPrecondition) as err:
        await world.rollouts.create(ALICE, PROD, ro.RolloutRequest(AGENT.version(1)))
    assert err.value.reason == "ALREADY_STABLE"
    with pytest.raises(InvalidArgument) as bad:
        await world.rollouts.create(ALICE, PROD, ro.RolloutRequest(VersionRef("other", 2)))
    assert [v.field for v in bad.value.violations] == ["rollout.candidate_version"]
    first = await start(world, ro.SetWeight(100))
    assert first.spec.strategy == "custom" and first.spec.rollback_policy is ro.SessionPolicy.DRAIN
    with pytest.raises(FailedPrecondition) as running:
        await start(world, ro.SetWeight(100))
    assert running.value.reason == "ROLLOUT_RUNNING" and running.value.metadata == {"running": first.name}
    canary = await world.rollouts.abort(ALICE, first.ref, "")
    assert canary.state is ro.RolloutState.ABORTED and canary.state_reason == "aborted by alice"
    default = await world.rollouts.create(ALICE, PROD, ro.RolloutRequest(AGENT.version(2)))
    assert default.spec.strategy == "canary" and default.spec.steps == (
        ro.SetWeight(10), ro.AnalysisGate(3600), ro.SetWeight(100))


# -- the controller ----------------------------------------------------------------------------


async def test_passing_analysis_walks_the_rollout_to_the_candidate(world: RegistryWorld) -> None:
    r = await start(world, ro.SetWeight(10), ro.AnalysisGate(600), ro.SetWeight(100))
    world.telemetry.verdicts = [ro.Analysis(ro.Verdict.PASS, (comparison("latency_p95", ro.Verdict.PASS),))]
    await world.controller.tick()
    assert await serving(world) == (TrafficShare(1, 9000), TrafficShare(2, 1000))
    world.clock.advance(5)
    await world.controller.tick()
    gated = await world.rollouts.get(ALICE, r.ref)
    assert gated.current_step == 2 and gated.last_analysis is not None
    assert world.telemetry.asked[0][3] == gated.traffic_start_time  # the window starts at 10%
    await world.controller.tick()
    done = await world.rollouts.get(ALICE, r.ref)
    assert done.state is ro.RolloutState.SUCCEEDED and done.current_weight == 100
    assert await serving(world) == (TrafficShare(2, 10_000),)
    assert world.announced.events == ["STARTED", "WEIGHT_SET", "ANALYSIS_PASSED", "SUCCEEDED"]
    audited = [(e.method, e.details.get("step")) for e in world.store.events if e.resource == r.name]
    assert audited == [("CreateRollout", None), ("Rollout:WEIGHT_SET", 0),
                       ("Rollout:ANALYSIS_PASSED", 1), ("Rollout:SUCCEEDED", 2)]


@pytest.mark.parametrize("policy", [ro.SessionPolicy.MIGRATE, ro.SessionPolicy.STOP])
async def test_failing_analysis_rolls_back_and_applies_the_session_policy(
    world: RegistryWorld, policy: ro.SessionPolicy
) -> None:
    r = await start(world, ro.SetWeight(50), ro.AnalysisGate(600), ro.SetWeight(100), policy=policy)
    failing = comparison("session_error_rate", ro.Verdict.FAIL, "0.33 > 0.01")
    world.telemetry.verdicts = [ro.Analysis(ro.Verdict.FAIL, (failing,))]
    await world.controller.tick()
    await world.controller.tick()
    done = await world.rollouts.get(ALICE, r.ref)
    assert done.state is ro.RolloutState.ROLLED_BACK
    assert done.state_reason == "analysis failed: session_error_rate 0.33 > 0.01"
    assert done.last_analysis == ro.Analysis(ro.Verdict.FAIL, (failing,))
    assert await serving(world) == (TrafficShare(1, 10_000),)
    [(version, endpoint, migrate_to, digest)] = world.sessions.retired
    assert (version, endpoint) == (AGENT.version(2), PROD)
    if policy is ro.SessionPolicy.MIGRATE:
        v1 = await world.registry.get_version(ALICE, AGENT.version(1))
        assert (migrate_to, digest) == (AGENT.version(1), v1.digest)
    else:
        assert migrate_to is None
    assert world.announced.transitions[-1].evidence == done.last_analysis


async def test_an_unreachable_telemetry_is_inconclusive_and_a_gate_waits_for_a_human(
    world: RegistryWorld,
) -> None:
    r = await start(world, ro.SetWeight(50), ro.AnalysisGate(60), ro.SetWeight(100))
    world.telemetry.down = True
    await world.controller.tick()
    await world.controller.tick()
    waiting = await world.rollouts.get(ALICE, r.ref)
    assert waiting.state is ro.RolloutState.PROGRESSING and waiting.last_analysis is not None
    assert waiting.last_analysis.verdict is ro.Verdict.INCONCLUSIVE
    assert "telemetry: UNAVAILABLE" in waiting.last_analysis.error
    world.clock.advance(61)
    await world.controller.tick()
    paused = await world.rollouts.get(ALICE, r.ref)
    assert paused.state is ro.RolloutState.PAUSED and "inconclusive after 61s" in paused.state_reason
    # Resuming continues at the gate, which still has to pass: the weight stays until it does.
    resumed = await world.rollouts.resume(ALICE, r.ref)
    assert resumed.current_step == 1 and resumed.state is ro.RolloutState.PROGRESSING
    with pytest.raises(FailedPrecondition) as err:
        await world.rollouts.resume(ALICE, r.ref)
    assert err.value.reason == "NOT_PAUSED"
    world.telemetry.down = False
    world.clock.advance(30)
    await world.controller.tick()
    held = await world.rollouts.get(ALICE, r.ref)
    assert (held.state, held.current_step, held.current_weight) == (ro.RolloutState.PROGRESSING, 1, 50)
    assert await serving(world) == (TrafficShare(1, 5000), TrafficShare(2, 5000))
    world.telemetry.verdicts = [ro.Analysis(ro.Verdict.PASS)]
    world.clock.advance(30)
    await world.controller.tick()
    await world.controller.tick()
    assert (await world.rollouts.get(ALICE, r.ref)).state is ro.RolloutState.SUCCEEDED
    assert world.announced.events[-3:] == ["RESUMED", "ANALYSIS_PASSED", "SUCCEEDED"]


async def test_pauses_wait_on_the_clock_and_manual_gates_on_a_human(world: RegistryWorld) -> None:
    r = await start(world, ro.SetWeight(20), ro.Pause(30), ro.ManualGate(), ro.SetWeight(100))
    for _ in range(3):
        await world.controller.tick()
    assert (await world.rollouts.get(ALICE, r.ref)).current_step == 1
    world.clock.advance(30)
    await world.controller.tick()
    await world.controller.tick()
    gate = await world.rollouts.get(ALICE, r.ref)
    assert gate.state is ro.RolloutState.PAUSED and gate.current_step == 2
    promoted = await world.rollouts.promote(ALICE, r.ref, full=False)
    assert promoted.current_step == 3 and "promoted past step 2 by alice" in promoted.state_reason
    await world.controller.tick()
    assert (await world.rollouts.get(ALICE, r.ref)).state is ro.RolloutState.SUCCEEDED
    with pytest.raises(FailedPrecondition) as err:
        await world.rollouts.pause(ALICE, r.ref, "")
    assert err.value.reason == "ROLLOUT_ENDED"


async def test_a_rollback_drains_the_candidate_and_stops_its_sessions_after_the_timeout(
    world: RegistryWorld,
) -> None:
    r = await start(world, ro.SetWeight(50), ro.ManualGate(), ro.SetWeight(100))
    await world.controller.tick()
    endpoint = await world.rollouts.rollback_endpoint(ALICE, PROD, None, ro.SessionPolicy.DRAIN)
    assert endpoint.traffic == (TrafficShare(1, 10_000),)
    assert (await world.rollouts.get(ALICE, r.ref)).state is ro.RolloutState.ROLLED_BACK
    assert world.sessions.retired == []  # draining: nothing yet
    world.clock.advance(r.spec.drain_timeout_s + 1)
    await world.controller.tick()
    assert [(v, m) for v, _, m, _ in world.sessions.retired] == [(AGENT.version(2), None)]
    assert (await world.rollouts.get(ALICE, r.ref)).spec.drained
    await world.controller.tick()
    assert len(world.sessions.retired) == 1
    with pytest.raises(FailedPrecondition) as err:
        await world.rollouts.rollback_endpoint(ALICE, PROD, None, ro.SessionPolicy.STOP)
    assert err.value.reason == "NO_STABLE_VERSION"


# -- experiments -------------------------------------------------------------------------------


def split(*variants: tuple[int, float]) -> tuple[ro.TrafficTarget, ...]:
    return tuple(ro.TrafficTarget(AGENT.version(v), p) for v, p in variants)


async def test_an_experiment_splits_the_endpoint_until_it_is_concluded(world: RegistryWorld) -> None:
    ends = world.clock.now() + timedelta(hours=1)
    request = ro.ExperimentRequest(split((1, 80), (3, 20)), end_time=ends)
    e = await world.experiments.create(ALICE, PROD, request)
    assert await serving(world) == (TrafficShare(1, 8000), TrafficShare(3, 2000))
    assert e.spec.control == 1 and e.state is ro.ExperimentState.RUNNING
    with pytest.raises(FailedPrecondition) as running:
        await start(world, ro.SetWeight(100))
    assert running.value.reason == "ROLLOUT_RUNNING"

    await world.controller.tick()
    assert (await world.experiments.get(ALICE, e.ref)).state is ro.ExperimentState.RUNNING
    world.clock.advance(3600)
    await world.controller.tick()
    complete = await world.experiments.get(ALICE, e.ref)
    assert complete.state is ro.ExperimentState.COMPLETE and complete.state_reason == "reached its end time"

    with pytest.raises(InvalidArgument) as both:
        await world.experiments.conclude(ALICE, e.ref, AGENT.version(3), keep_control=True)
    assert [v.field for v in both.value.violations] == ["winner"]
    with pytest.raises(InvalidArgument):
        await world.experiments.conclude(ALICE, e.ref, AGENT.version(2), keep_control=False)
    world.telemetry.down = True
    concluded = await world.experiments.conclude(ALICE, e.ref, AGENT.version(3), keep_control=False)
    assert concluded.state is ro.ExperimentState.CONCLUDED and concluded.spec.winner == 3
    assert await serving(world) == (TrafficShare(3, 10_000),)
    evidence = world.announced.transitions[-1].evidence
    assert evidence == ro.ExperimentAnalysis(error="telemetry unavailable when concluding")
    with pytest.raises(FailedPrecondition) as ended:
        await world.experiments.conclude(ALICE, e.ref, None, keep_control=True)
    assert ended.value.reason == "EXPERIMENT_ENDED"


async def test_an_experiment_is_checked_before_anything_changes(world: RegistryWorld) -> None:
    cases = {
        "experiment.variants": ro.ExperimentRequest(split((1, 100))),
        "endpoint.traffic": ro.ExperimentRequest(split((1, 80), (3, 30))),
        "experiment.variants[1].version": ro.ExperimentRequest(
            (ro.TrafficTarget(AGENT.version(1), 50), ro.TrafficTarget(VersionRef("other", 2), 50))),
        "experiment.end_time": ro.ExperimentRequest(split((1, 50), (2, 50)), end_time=world.clock.now()),
        "experiment.alpha": ro.ExperimentRequest(split((1, 50), (2, 50)), alpha=1.5),
        "metrics[0].name": ro.ExperimentRequest(split((1, 50), (2, 50)), metrics=(ro.MetricSpec("mood"),)),
    }
    for field, request in cases.items():
        with pytest.raises(InvalidArgument) as err:
            await world.experiments.create(ALICE, PROD, request)
        assert [v.field for v in err.value.violations] == [field]
    assert await world.store.active_runs() == []


def test_a_winner_is_recommended_only_when_it_beats_the_control_on_every_metric() -> None:
    def variant(version: str, low: float, high: float, control: bool = False) -> ro.VariantMetric:
        return ro.VariantMetric(version, 100, 0.5, 0.4, 0.6, control, (low + high) / 2, low, high)

    def metric(direction: Direction, *variants: ro.VariantMetric) -> ro.ExperimentMetric:
        return ro.ExperimentMetric(ro.MetricSpec("m", direction), "", variants)

    control = variant("v1", 0, 0, control=True)
    better = ro.ExperimentAnalysis(metrics=(
        metric(Direction.LOWER_IS_BETTER, control, variant("v2", -0.2, -0.1), variant("v3", -0.1, 0.1)),
        metric(Direction.HIGHER_IS_BETTER, control, variant("v2", 0.1, 0.3), variant("v3", 0.1, 0.2)),
    ))
    assert recommend(better) == ("v2", "v2 beats the control on every metric")
    assert recommend(ro.ExperimentAnalysis(metrics=better.metrics[1:]))[0] == ""
    skewed = ro.ExperimentAnalysis(metrics=better.metrics, sample_ratio_mismatch=True,
                                sample_ratio_p_value=0.001)
    assert recommend(skewed)[0] == "" and "sample ratio mismatch" in recommend(skewed)[1]
    gappy = ro.ExperimentAnalysis(metrics=better.metrics, missing_data="3 spans dropped by e1")
    assert recommend(gappy) == (
        "", "missing data: 3 spans dropped by e1; no winner can be named until it arrives")
