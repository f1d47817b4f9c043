"""Rollouts with real registry, telemetry and sessions servers, and what people do to them: a
manual endpoint change, rollbacks racing the controller, an experiment an older release ended,
and bad input refused with its reason."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import grpc
import pytest
from google.protobuf import json_format

from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import rollouts_pb2 as ro
from corral.telemetry.v1 import telemetry_pb2 as tel
from tests.conftest import StartServices
from tests.rollout_world import (
    ALICE,
    USER,
    State,
    World,
    analysis,
    gate,
    manual,
    ready,
    state,
    weight,
)
from tests.rpc import described, error_details, fails

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


# -- 1. a manual endpoint change aborts --------------------------------------------------------


async def test_manual_endpoint_update_aborts_the_rollout(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world, versions=3)
    r = await w.start_rollout(2, [weight(10), gate(60), weight(100)])
    await w.wait(r.name, lambda x: x.current_step == 1, what="at its analysis gate")
    endpoint = await w.set_endpoint(3)
    assert [(t.version, t.percent) for t in endpoint.traffic] == [(w.version(3), 100.0)]

    aborted = await w.rollout(r.name)
    assert state(aborted) == "ABORTED"
    assert "endpoint set manually" in aborted.state_reason and USER in aborted.state_reason, aborted.state_reason
    audited = [e for e in await w.audit(r.name) if e.method == "AbortRollout"]
    assert len(audited) == 1 and audited[0].user == described(ALICE)
    assert "manually" in json_format.MessageToDict(audited[0].details)["reason"]
    await asyncio.sleep(1.2)  # the controller leaves the manual setting alone
    assert await w.traffic() == [(w.version(3), 100.0)]
    assert state(await w.rollout(r.name)) == "ABORTED"
    # The endpoint is free for the next rollout.
    nxt = await w.start_rollout(2, [weight(100)])
    assert (await w.wait(nxt.name, lambda x: state(x) != "PROGRESSING")).state == State.ROLLOUT_STATE_SUCCEEDED


# -- 2. a manual rollback racing the controller ------------------------------------------------


async def test_manual_rollback_racing_the_controller_leaves_one_consistent_endpoint(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world)
    # Nine weight steps in a row: the controller applies them back to back while we roll back.
    steps = [weight(p) for p in range(10, 100, 10)] + [manual(), weight(100)]
    first = (await w.get_endpoint()).revision
    revisions = 0
    for round_ in range(6):
        before = (await w.get_endpoint()).revision
        r = await w.start_rollout(2, steps)
        await asyncio.sleep(0.012 * round_)  # catch the controller at different steps
        request = ro.RollbackEndpointRequest(name=w.endpoint)
        results = await asyncio.gather(
            *(w.rollouts.RollbackEndpoint(request, metadata=ALICE) for _ in range(3)), return_exceptions=True)
        ok = [x for x in results if isinstance(x, reg.Endpoint)]
        errors = [x for x in results if not isinstance(x, reg.Endpoint)]
        # One rollback ends the rollout; the others find nothing earlier to go back to.
        assert len(ok) == 1, results
        for err in errors:
            assert isinstance(err, grpc.aio.AioRpcError), err
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, f"{err.code()}: {err.details()}"
            assert "no earlier stable version" in (err.details() or "")
        assert [(t.version, t.percent) for t in ok[0].traffic] == [(w.version(1), 100.0)]

        await asyncio.sleep(0.3)  # the controller's next steps would follow at once
        ended = await w.rollout(r.name)
        assert state(ended) == "ROLLED_BACK" and ended.current_weight == 0, ended.state_reason
        assert f"rolled back by {USER}" in ended.state_reason
        endpoint = await w.get_endpoint()
        assert [(t.version, t.percent) for t in endpoint.traffic] == [(w.version(1), 100.0)]
        # Every revision is accounted for: one per weight step the controller applied, then the
        # rollback's, which is the last.
        methods = [m for m, _ in await w.rollout_events(r.name)]
        assert "Rollout:SUCCEEDED" not in methods and "Rollout:ROLLED_BACK" not in methods, methods
        applied = methods.count("Rollout:WEIGHT_SET")
        assert endpoint.revision == before + applied + 1 == ok[0].revision, (before, applied, endpoint.revision)
        revisions += applied + 1
    await asyncio.sleep(1.2)  # a full controller tick later, nothing moved
    endpoint = await w.get_endpoint()
    assert endpoint.revision == first + revisions
    assert [(t.version, t.percent) for t in endpoint.traffic] == [(w.version(1), 100.0)]
    listed = await w.rollouts.ListRollouts(ro.ListRolloutsRequest(parent=w.endpoint))
    assert [state(x) for x in listed.rollouts] == ["ROLLED_BACK"] * 6
    rollbacks = [e for e in await w.audit(w.endpoint) if e.method == "RollbackEndpoint"]
    assert len(rollbacks) == 6


async def test_an_experiment_an_older_release_ended_by_rollback_reads_as_aborted(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    """Before experiments had states of their own, an endpoint rollback wrote ROLLED_BACK into
    the experiment it ended; such rows must still list and read (as ABORTED, which they were)."""
    await start_services("telemetry", "sessions", "registry")
    w = await ready(make_world)
    experiment = ro.Experiment(variants=[reg.TrafficTarget(version=w.version(1), percent=50),
                                         reg.TrafficTarget(version=w.version(2), percent=50)])
    made = await w.rollouts.CreateExperiment(
        ro.CreateExperimentRequest(parent=w.endpoint, experiment=experiment), metadata=ALICE)
    conn = await asyncpg.connect(w.settings.require_database())
    try:
        await conn.execute(
            "UPDATE registry.rollouts SET state = 'ROLLED_BACK', end_time = now() "
            "WHERE agent = $1 AND kind = 'experiment'", w.agent)
    finally:
        await conn.close()
    got = await w.rollouts.GetExperiment(ro.GetExperimentRequest(name=made.name), metadata=ALICE)
    assert got.state == ro.EXPERIMENT_STATE_ABORTED
    listed = await w.rollouts.ListExperiments(
        ro.ListExperimentsRequest(parent=w.endpoint), metadata=ALICE)
    assert [e.name for e in listed.experiments] == [made.name]


# -- 3. bad input ------------------------------------------------------------------------------


async def test_bad_input_is_refused_with_its_reason_and_changes_nothing(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry", "sessions", "registry")
    w = await ready(make_world)
    ok_steps = [weight(50), weight(100)]

    async def snapshot() -> tuple[int, int, int]:
        listed = await w.rollouts.ListRollouts(ro.ListRolloutsRequest(parent=w.endpoint))
        return (await w.get_endpoint()).revision, len(listed.rollouts), len(await w.audit(f"agents/{w.agent}/"))

    before = await snapshot()
    Code = grpc.StatusCode

    err = await fails(Code.FAILED_PRECONDITION, w.start_rollout(1, ok_steps))
    assert "already the stable version" in err.details()
    err = await fails(Code.FAILED_PRECONDITION, w.start_rollout(9, ok_steps))
    assert w.version(9) in err.details() and "does not exist" in err.details()
    err = await fails(Code.INVALID_ARGUMENT, w.start_rollout(2, [weight(50), weight(30), weight(100)]))
    assert "does not increase" in err.details() and "steps[1]" in str(error_details(err)[1])
    err = await fails(Code.INVALID_ARGUMENT, w.start_rollout(2, [weight(50), weight(150)]))
    assert "150" in err.details() and "<= 100" in err.details()
    err = await fails(Code.INVALID_ARGUMENT, w.start_rollout(2, [weight(50), weight(90)]))
    assert "must end at set_weight 100" in err.details()
    err = await fails(Code.INVALID_ARGUMENT, w.start_rollout(
        2, ok_steps, analysis(20, tel.MetricSpec(name="happiness"))))
    assert "'happiness' is not a metric" in err.details()
    assert error_details(err)[1] == ["metrics[0].name"]
    err = await fails(Code.INVALID_ARGUMENT, w.start_rollout(
        2, ok_steps, analysis(20, tel.MetricSpec(name="session_error_rate", tolerance=-0.1))))
    assert "-0.1" in err.details() and "negative" in err.details()
    assert error_details(err)[1] == ["metrics[0].tolerance"]
    experiment = ro.Experiment(variants=[reg.TrafficTarget(version=w.version(1), percent=80),
                                         reg.TrafficTarget(version=w.version(2), percent=30)])
    err = await fails(Code.INVALID_ARGUMENT, w.rollouts.CreateExperiment(
        ro.CreateExperimentRequest(parent=w.endpoint, experiment=experiment), metadata=ALICE))
    assert "add up to 110%" in err.details()
    assert await snapshot() == before, "a refused request changed something"

    # Actions on a finished rollout.
    r = await w.start_rollout(2, [weight(50), manual(), weight(100)])
    r = await w.rollouts.AbortRollout(ro.AbortRolloutRequest(name=r.name, reason="changed my mind"), metadata=ALICE)
    assert state(r) == "ABORTED" and r.state_reason == "changed my mind"
    after_abort = await snapshot()
    for call in (
        w.rollouts.PromoteRollout(ro.PromoteRolloutRequest(name=r.name), metadata=ALICE),
        w.rollouts.PromoteRollout(ro.PromoteRolloutRequest(name=r.name, full=True), metadata=ALICE),
        w.rollouts.PauseRollout(ro.PauseRolloutRequest(name=r.name), metadata=ALICE),
        w.rollouts.ResumeRollout(ro.ResumeRolloutRequest(name=r.name), metadata=ALICE),
        w.rollouts.AbortRollout(ro.AbortRolloutRequest(name=r.name), metadata=ALICE),
    ):
        err = await fails(Code.FAILED_PRECONDITION, call)
        assert r.name in err.details() and "already ended (aborted)" in err.details()
    assert await snapshot() == after_abort
    assert await w.traffic() == [(w.version(1), 100.0)]
    await fails(Code.NOT_FOUND, w.rollouts.GetRollout(ro.GetRolloutRequest(name=f"{w.endpoint}/rollouts/99")))

    err = await fails(Code.NOT_FOUND, w.telemetry.RecordScore(tel.RecordScoreRequest(score=tel.Score(
        session="sessions/never-ran", score_name="quality", value=0.5)), metadata=ALICE))
    assert "sessions/never-ran" in err.details()
    listed = await w.telemetry.ListScores(
        tel.ListScoresRequest(filter=tel.SpanFilter(session="sessions/never-ran")), metadata=ALICE)
    assert list(listed.scores) == []
