"""The rollout state machine with real registry and telemetry servers on real PostgreSQL: a
rollout held at a pending analysis gate and resumed still waits for the analysis to pass; every
action (and a registry restart) in every state leaves what the table says, and nothing but a
pass or a human raises the candidate's weight."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import grpc
import pytest
from google.protobuf import json_format

from corral.registry.v1 import rollouts_pb2 as ro
from corral.telemetry.v1 import telemetry_pb2 as tel
from tests import harness
from tests.conftest import StartServices
from tests.rollout_world import ALICE, World, analysis, gate, manual, ready, state, weight
from tests.rpc import error_details, fails

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
    assert (state(resumed), resumed.current_step) == ("PROGRESSING", 1), resumed.state_reason
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


# -- every (state, action) pair ----------------------------------------------------------------

# Two gates, so that a promote visibly skips exactly one: 10%, gate, 50%, gate, 100%. The
# analysis needs 100 sessions per version and gets 16: it never passes in these tests, so any
# weight above 10% comes from a human's promote (or a resume at a manual gate, which waits for it).
STEPS = [weight(10), gate(600), weight(50), gate(600), weight(100)]
GATE_RUNS_OUT = [weight(10), gate(2), weight(50), gate(600), weight(100)]
MANUAL_GATE = [weight(10), manual(), weight(50), gate(600), weight(100)]
HOLD_S = 2.5  # a few controller ticks and analysis intervals


@dataclass(frozen=True)
class Seen:
    """What `corral rollout status` and `corral endpoint get` show."""

    state: str
    step: int
    weight: float
    # The version the endpoint serves alone when that is not the rollout's split (a manual set,
    # a rollback after the rollout ended).
    serving: int = 0
    # The refusal (gRPC code, ErrorInfo reason) when the action is refused.
    refused: tuple[grpc.StatusCode, str] | None = None


async def started(w: World, steps: list[ro.RolloutStep]) -> ro.Rollout:
    r = await w.start_rollout(2, steps, analysis(100))
    await w.wait(r.name, lambda x: x.current_step == 1, what="at its first gate")
    await w.send_sessions(1, 16)
    await w.send_sessions(2, 16)
    return r


async def progressing_at_a_gate(w: World) -> ro.Rollout:
    r = await started(w, STEPS)
    return await w.wait(r.name, lambda x: x.last_analysis.verdict == tel.VERDICT_INCONCLUSIVE,
                        what="analysed as inconclusive")


async def paused_at_a_gate(w: World) -> ro.Rollout:
    r = await progressing_at_a_gate(w)
    return await w.rollouts.PauseRollout(ro.PauseRolloutRequest(name=r.name), metadata=ALICE)


async def paused_when_the_gate_ran_out(w: World) -> ro.Rollout:
    r = await started(w, GATE_RUNS_OUT)
    return await w.wait(r.name, lambda x: state(x) == "PAUSED", what="paused by its gate")


async def paused_at_a_manual_gate(w: World) -> ro.Rollout:
    r = await started(w, MANUAL_GATE)
    return await w.wait(r.name, lambda x: state(x) == "PAUSED", what="paused at its manual gate")


async def succeeded(w: World) -> ro.Rollout:
    r = await progressing_at_a_gate(w)
    return await w.rollouts.PromoteRollout(ro.PromoteRolloutRequest(name=r.name, full=True), metadata=ALICE)


async def rolled_back(w: World) -> ro.Rollout:
    r = await progressing_at_a_gate(w)
    await w.rollouts.RollbackEndpoint(ro.RollbackEndpointRequest(name=w.endpoint), metadata=ALICE)
    return await w.rollout(r.name)


async def aborted(w: World) -> ro.Rollout:
    r = await progressing_at_a_gate(w)
    return await w.rollouts.AbortRollout(ro.AbortRolloutRequest(name=r.name), metadata=ALICE)


STATES: dict[str, Callable[[World], Awaitable[ro.Rollout]]] = {
    "progressing at a gate": progressing_at_a_gate,
    "paused at a gate": paused_at_a_gate,
    "paused: gate ran out": paused_when_the_gate_ran_out,
    "paused at a manual gate": paused_at_a_manual_gate,
    "succeeded": succeeded,
    "rolled back": rolled_back,
    "aborted": aborted,
}

ACTIONS: dict[str, Callable[[World, str], Awaitable[object]]] = {
    "pause": lambda w, name: w.rollouts.PauseRollout(ro.PauseRolloutRequest(name=name), metadata=ALICE),
    "resume": lambda w, name: w.rollouts.ResumeRollout(ro.ResumeRolloutRequest(name=name), metadata=ALICE),
    "abort": lambda w, name: w.rollouts.AbortRollout(ro.AbortRolloutRequest(name=name), metadata=ALICE),
    "promote": lambda w, name: w.rollouts.PromoteRollout(
        ro.PromoteRolloutRequest(name=name), metadata=ALICE),
    "promote --full": lambda w, name: w.rollouts.PromoteRollout(
        ro.PromoteRolloutRequest(name=name, full=True), metadata=ALICE),
    "rollback": lambda w, name: w.rollouts.RollbackEndpoint(
        ro.RollbackEndpointRequest(name=w.endpoint), metadata=ALICE),
    "endpoint set": lambda w, name: w.set_endpoint(3),
}

Code = grpc.StatusCode
HELD = Seen("PAUSED", 1, 10)
AT_GATE = Seen("PROGRESSING", 1, 10)
NEXT_GATE = Seen("PROGRESSING", 3, 50)  # past one gate, 50% set, held at the next gate
ABORTED = Seen("ABORTED", 1, 0)
ROLLED_BACK = Seen("ROLLED_BACK", 1, 0)
SUCCEEDED = Seen("SUCCEEDED", len(STEPS), 100)
ON_V3 = 3  # what `endpoint set` puts on the endpoint
ACTIVE = ("progressing at a gate", "paused at a gate", "paused: gate ran out", "paused at a manual gate")
ENDED = {"succeeded": SUCCEEDED, "rolled back": ROLLED_BACK, "aborted": ABORTED}


def ended_refuses(seen: Seen) -> Seen:
    return replace(seen, refused=(Code.FAILED_PRECONDITION, "ROLLOUT_ENDED"))


# What each action leaves, once the controller has had several ticks to act on it.
EXPECTED: dict[tuple[str, str], Seen] = {
    **{(s, "pause"): HELD for s in ACTIVE},
    ("progressing at a gate", "resume"): replace(AT_GATE, refused=(Code.FAILED_PRECONDITION, "NOT_PAUSED")),
    ("paused at a gate", "resume"): AT_GATE,
    ("paused: gate ran out", "resume"): HELD,  # evaluated again, still inconclusive: paused again
    ("paused at a manual gate", "resume"): NEXT_GATE,  # the manual gate waited for exactly this
    **{(s, "abort"): ABORTED for s in ACTIVE},
    **{(s, "promote"): NEXT_GATE for s in ACTIVE},
    **{(s, "promote --full"): SUCCEEDED for s in ACTIVE},
    **{(s, "rollback"): ROLLED_BACK for s in ACTIVE},
    **{(s, "endpoint set"): replace(ABORTED, serving=ON_V3) for s in ACTIVE},
    **{(s, a): ended_refuses(seen) for s, seen in ENDED.items()
       for a in ("pause", "resume", "abort", "promote", "promote --full")},
    ("succeeded", "rollback"): replace(SUCCEEDED, serving=1),  # the endpoint goes back to v1
    ("rolled back", "rollback"): replace(ROLLED_BACK, refused=(Code.FAILED_PRECONDITION, "NO_STABLE_VERSION")),
    ("aborted", "rollback"): replace(ABORTED, refused=(Code.FAILED_PRECONDITION, "NO_STABLE_VERSION")),
    **{(s, "endpoint set"): replace(seen, serving=ON_V3) for s, seen in ENDED.items()},
}


def test_the_table_covers_every_state_and_action() -> None:
    assert set(EXPECTED) == {(s, a) for s in STATES for a in ACTIONS}


def shown(w: World, want: Seen) -> tuple[str, int, float, list[tuple[str, float]]]:
    """What a user should see: the rollout, and the endpoint's split (sorted by version)."""
    if want.serving:
        traffic = [(w.version(want.serving), 100.0)]
    elif want.weight in (0, 100):
        traffic = [(w.version(1 if want.weight == 0 else 2), 100.0)]
    else:
        traffic = [(w.version(1), 100.0 - want.weight), (w.version(2), want.weight)]
    return want.state, want.step, want.weight, traffic


async def observed(w: World, name: str) -> tuple[str, int, float, list[tuple[str, float]]]:
    r = await w.rollout(name)
    return state(r), r.current_step, r.current_weight, sorted(await w.traffic())


async def weights(w: World, name: str) -> list[float]:
    """Every weight the rollout's audit events recorded, oldest first."""
    out = []
    for e in await w.audit(name):
        details = json_format.MessageToDict(e.details)
        if e.resource == name and "weight" in details:
            out.append(float(details["weight"]))
    return out


async def settled(w: World, name: str, want: Seen, what: str) -> None:
    deadline = time.monotonic() + 15
    while await observed(w, name) != shown(w, want) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert await observed(w, name) == shown(w, want), what


@pytest.mark.parametrize("action", list(ACTIONS))
async def test_each_action_in_each_state(
    start_services: StartServices, make_world: Callable[..., World], action: str
) -> None:
    await start_services("telemetry", "registry")
    worlds = {s: await ready(make_world, versions=3) for s in STATES}
    rollouts = dict(zip(STATES, await asyncio.gather(*(STATES[s](worlds[s]) for s in STATES)), strict=True))
    before = {s: len(await weights(worlds[s], rollouts[s].name)) for s in STATES}

    async def act(s: str) -> None:
        w, want = worlds[s], EXPECTED[(s, action)]
        call = ACTIONS[action](w, rollouts[s].name)
        if want.refused is None:
            await call
            return
        code, reason = want.refused
        err = await fails(code, call)
        assert error_details(err)[0].reason == reason, f"{s}: {err.details()}"

    await asyncio.gather(*(act(s) for s in STATES))
    for s in STATES:
        await settled(worlds[s], rollouts[s].name, EXPECTED[(s, action)], f"{action} when {s}")
    await asyncio.sleep(HOLD_S)  # and nothing moves on by itself
    for s in STATES:
        w, name, want = worlds[s], rollouts[s].name, EXPECTED[(s, action)]
        assert await observed(w, name) == shown(w, want), f"{action} when {s}: moved on"
        # Never, even for a moment, more than the table allows; and no analysis ever passed.
        after = (await weights(w, name))[before[s]:]
        assert max(after, default=0.0) <= want.weight, (s, after)
        methods = [m for m, _ in await w.rollout_events(name)]
        assert "Rollout:ANALYSIS_PASSED" not in methods, (s, methods)


# A registry restarted (the controller rebuilt from PostgreSQL) leaves every rollout as it was.
RESTARTED: dict[str, Seen] = {
    "progressing at a gate": AT_GATE,
    "paused at a gate": HELD,
    "paused: gate ran out": HELD,
    "paused at a manual gate": HELD,
    **ENDED,
}


async def test_a_registry_restart_in_each_state_changes_nothing(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry")
    first = (await start_services("registry"))["registry"]
    second = None
    try:
        worlds = {s: await ready(make_world, versions=3) for s in STATES}
        made = await asyncio.gather(*(STATES[s](worlds[s]) for s in STATES))
        names = {s: r.name for s, r in zip(STATES, made, strict=True)}
        for s in STATES:
            await settled(worlds[s], names[s], RESTARTED[s], f"{s} before the restart")
        await first.stop(grace=0.2)
        await asyncio.sleep(HOLD_S)  # the gates' analysis intervals pass while no registry is up
        second = await harness.restart(first)
        await asyncio.sleep(HOLD_S)
        for s in STATES:
            w, name = worlds[s], names[s]
            assert await observed(w, name) == shown(w, RESTARTED[s]), f"{s}: moved after a restart"
            assert "Rollout:ANALYSIS_PASSED" not in [m for m, _ in await w.rollout_events(name)]
        # Resumed after the restart, the gate it was paused at still holds the weight.
        w, name = worlds["paused at a gate"], names["paused at a gate"]
        await w.rollouts.ResumeRollout(ro.ResumeRolloutRequest(name=name), metadata=ALICE)
        await asyncio.sleep(HOLD_S)
        assert await observed(w, name) == shown(w, AT_GATE)
    finally:
        await first.stop(grace=0.2)
        if second is not None:
            await second.stop(grace=0.2)
