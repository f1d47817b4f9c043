"""The analysis behind rollouts, deciding from synthetic executor spans and recorded scores:
a failing candidate rolled back with its sessions migrated or stopped, and scores moving
the score metric."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import pytest
from google.protobuf import timestamp_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub

from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import rollouts_pb2 as ro
from corral.sessions.v1 import sessions_pb2 as ses
from corral.telemetry.v1 import telemetry_pb2 as tel
from corral.telemetry.v1.telemetry_pb2_grpc import TelemetryServiceStub
from tests.conftest import StartServices
from tests.credentials import public_channel
from tests.otlp import export_request, kv
from tests.rollout_world import (
    ALICE,
    World,
    analysis,
    gate,
    invocation_span,
    ready,
    state,
    weight,
)
from tests.rpc import new_tenant

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


# -- 1. the analysis decides -------------------------------------------------------------------


async def test_another_tenants_forged_spans_move_no_rollout(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    """The forge that once rolled back a tenant's live canary: another tenant's operator exports
    failing `invoke_agent` spans naming the victim's tenant, agent and candidate version. They
    land in the forger's own tenant, as no invocation, and the victim's rollout succeeds."""
    await start_services("telemetry", "registry", "sessions")
    w = await ready(make_world)
    r = await w.start_rollout(2, [weight(50), gate(30), weight(100)], analysis(20))
    await w.wait(r.name, lambda x: x.current_weight == 50, what="at 50%")

    forged = [invocation_span(w.agent, 2, w.endpoint_id, f"forged-{i}", error=True) for i in range(90)]
    forger = new_tenant()
    async with public_channel(w.settings.addrs["telemetry"], forger, "mallory", "operator") as ch:
        await TraceServiceStub(ch).Export(
            export_request(forged, [kv("service.name", "corral-executor")]))
        mine = await TelemetryServiceStub(ch).ListSpans(
            tel.ListSpansRequest(filter=tel.SpanFilter(agent=f"agents/{w.agent}"), page_size=200))
    assert len(mine.spans) == 90 and {s.tenant for s in mine.spans} == {forger}
    # Both versions serve the victim the same way (as in test_equal_candidate_is_promoted...).
    await w.send_sessions(1, 200)
    await w.send_sessions(2, 200)

    done = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="decided")
    assert state(done) == "SUCCEEDED", done.state_reason
    assert all(c.candidate.sessions == 200 for c in done.last_analysis.comparisons)



@pytest.mark.parametrize("policy", ["MIGRATE", "STOP"])
async def test_failing_candidate_is_rolled_back_by_the_analysis(
    start_services: StartServices, make_world: Callable[..., World], policy: str
) -> None:
    await start_services("telemetry", "registry", "sessions")
    w = await ready(make_world)
    stable, candidate = w.versions[1], w.versions[2]

    async def new_session(v: reg.Version) -> str:
        s = await w.sessions.CreateSession(ses.CreateSessionRequest(session=ses.Session(
            agent=f"agents/{w.agent}", version=v.name, version_digest=v.digest, endpoint=w.endpoint)),
            metadata=ALICE)
        return s.name

    on_candidate = [await new_session(candidate) for _ in range(3)]
    on_stable = await new_session(stable)
    r = await w.start_rollout(2, [weight(50), gate(30), weight(100)], analysis(20),
                              policy=getattr(ro, f"SESSION_POLICY_{policy}"))
    await w.wait(r.name, lambda x: x.current_weight == 50, what="at 50%")
    # The candidate fails one session in three; the stable version almost never.
    await w.send_sessions(2, 90, fail_every=3)
    await w.send_sessions(1, 90, fail_every=90)

    done = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="rolled back")
    assert state(done) == "ROLLED_BACK", done.state_reason
    assert "session_error_rate" in done.state_reason
    failing = {c.metric.name: c for c in done.last_analysis.comparisons if c.verdict == tel.VERDICT_FAIL}
    assert "session_error_rate" in failing, done.last_analysis
    session_errors = failing["session_error_rate"]
    assert session_errors.candidate.estimate == pytest.approx(1 / 3, abs=0.02)
    assert session_errors.baseline.estimate == pytest.approx(1 / 90, abs=0.01)
    assert session_errors.ci_low > 0
    assert await w.traffic() == [(stable.name, 100.0)]
    assert ("Rollout:ROLLED_BACK", 1) in await w.rollout_events(r.name)

    async def session(name: str) -> ses.Session:
        return await w.sessions.GetSession(ses.GetSessionRequest(name=name), metadata=ALICE)

    deadline = time.monotonic() + 10
    while True:  # the policy runs right after the rollback commits
        seen = [await session(n) for n in on_candidate]
        if policy == "MIGRATE":
            settled = all(s.version == stable.name for s in seen)
        else:
            settled = all(s.status == ses.SESSION_STATUS_STOPPED for s in seen)
        if settled or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    if policy == "MIGRATE":
        assert [(s.version, s.version_digest, s.status) for s in seen] == \
            [(stable.name, stable.digest, ses.SESSION_STATUS_ACTIVE)] * 3
    else:
        assert [(s.version, s.status) for s in seen] == [(candidate.name, ses.SESSION_STATUS_STOPPED)] * 3
    untouched = await session(on_stable)
    assert (untouched.version, untouched.status) == (stable.name, ses.SESSION_STATUS_ACTIVE)


# -- 2. scores move the score metric -----------------------------------------------------------


async def test_recorded_scores_move_the_score_metric(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry")
    w = make_world("scored")
    start = timestamp_pb2.Timestamp()
    start.FromNanoseconds(time.time_ns() - 1_000_000_000)
    base_ids = await w.send_sessions(1, 4)
    cand_ids = await w.send_sessions(2, 4)

    async def compare() -> tel.MetricComparison:
        end = timestamp_pb2.Timestamp()
        end.FromNanoseconds(time.time_ns() + 1_000_000_000)
        response = await w.analysis.CompareVersions(tel.CompareVersionsRequest(
            agent=f"agents/{w.agent}", baseline_version=w.version(1), candidate_version=w.version(2),
            start_time=start, end_time=end, metrics=[tel.MetricSpec(name="score:quality")], min_sessions=2,
            endpoint=w.endpoint), metadata=ALICE)
        assert [c.metric.name for c in response.comparisons] == ["score:quality"]
        return response.comparisons[0]

    nothing = await compare()
    assert nothing.verdict == tel.VERDICT_INCONCLUSIVE and "no score:quality values" in nothing.explanation
    assert (nothing.baseline.sessions, nothing.candidate.sessions) == (4, 4)

    async def score(sid: str, value: float) -> tel.Score:
        return await w.telemetry.RecordScore(tel.RecordScoreRequest(score=tel.Score(
            session=f"sessions/{sid}", score_name="quality", value=value, source=tel.SCORE_SOURCE_HUMAN)),
            metadata=ALICE)

    # The baseline: one session scored twice (its mean, 0.6, counts once) and three more.
    recorded = {w.version(1): [(base_ids[0], 0.5), (base_ids[0], 0.7), (base_ids[1], 0.8),
                               (base_ids[2], 1.0), (base_ids[3], 0.9)],
                w.version(2): [(cand_ids[0], 0.2), (cand_ids[1], 0.4), (cand_ids[2], 0.3)]}
    for version, values in recorded.items():
        for sid, value in values:
            s = await score(sid, value)
            assert s.version == version and s.value == value
    moved = await compare()
    assert moved.baseline.estimate == pytest.approx((0.6 + 0.8 + 1.0 + 0.9) / 4)
    assert moved.candidate.estimate == pytest.approx((0.2 + 0.4 + 0.3) / 3)
    assert moved.difference == pytest.approx(moved.candidate.estimate - moved.baseline.estimate)
    assert moved.ci_low <= moved.difference <= moved.ci_high

    await score(cand_ids[3], 1.0)  # one more score moves the candidate's mean again
    again = await compare()
    assert again.candidate.estimate == pytest.approx((0.2 + 0.4 + 0.3 + 1.0) / 4)
    assert again.baseline.estimate == pytest.approx(moved.baseline.estimate)
    per_version = Counter(s.version for s in (await w.telemetry.ListScores(tel.ListScoresRequest(
        score_name="quality", filter=tel.SpanFilter(version=w.version(2))), metadata=ALICE)).scores)
    assert per_version == {w.version(2): 4}
