"""Telemetry across tenants: the same trace, span and session ids in two tenants are two things;
traces, spans, metrics, scores and comparisons are read in the caller's tenant only; and who may
score a session (an operator any of the tenant's, an invoker its own, as user feedback). Real
server and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from google.protobuf.timestamp_pb2 import Timestamp

from corral.names import SessionRef
from corral.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from corral.telemetry.v1 import telemetry_pb2 as pb
from services.common import db
from services.common.auth.principal import Principal, Role
from services.common.clock import SystemClock
from services.common.errors import NotFound, PermissionDenied
from services.telemetry.clients import SessionsClient
from services.telemetry.delivery import Deliveries
from services.telemetry.evaluation import Evaluation
from services.telemetry.model import ScoreInput, ScoreSource
from services.telemetry.store import PgDeliveryStore, PgScoreStore, PgSpanStore
from tests.credentials import internal_channel
from tests.otlp import MS, T0, export_request, invocation, otlp_span
from tests.rpc import fails, who
from tests.telemetry_client import Telemetry, uid

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _time(ns: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


async def _ran(
    telemetry: Telemetry, tenant: str, agent: str, version: int, session: str, trace: int,
    user: str = "alice", name: str = "invoke_agent",
) -> str:
    """Exports one invocation of `version` in `session` for `user` of `tenant`; its trace id."""
    attrs = {**invocation(agent, version, session, tenant), "corral.user": user, "name": name}
    await telemetry.otlp.Export(export_request([otlp_span(trace, 1, 0, 10, attrs)]))
    return format(trace, "032x")


async def test_the_same_ids_in_two_tenants_are_two_traces(telemetry: Telemetry) -> None:
    a, b, agent = f"a-{uid()}", f"b-{uid()}", f"agents/t-{uid()}"
    trace = uuid.uuid4().int >> 1
    # Both tenants export a span with the same trace and span ids: neither hides the other's.
    trace_id = await _ran(telemetry, a, agent, 1, "sessions/s1", trace, name="a's turn")
    await _ran(telemetry, b, agent, 2, "sessions/s1", trace, name="b's turn")
    for tenant, name, version in ((a, "a's turn", 1), (b, "b's turn", 2)):
        md = who(tenant)
        spans = await telemetry.api.ListSpans(
            pb.ListSpansRequest(filter=pb.SpanFilter(trace_id=trace_id)), metadata=md
        )
        assert [s.name for s in spans.spans] == [name]
        traces = await telemetry.api.ListTraces(
            pb.ListTracesRequest(filter=pb.SpanFilter(session="sessions/s1", agent=agent)),
            metadata=md,
        )
        assert [(t.trace_id, t.span_count) for t in traces.traces] == [(trace_id, 1)]
        metrics = await telemetry.api.GetVersionMetrics(
            pb.GetVersionMetricsRequest(agent=agent), metadata=md
        )
        assert [(m.version, m.invocations) for m in metrics.versions] == [
            (f"{agent}/versions/{version}", 1)
        ]


async def test_scores_and_comparisons_stay_in_their_tenant(telemetry: Telemetry) -> None:
    a, b, agent = f"a-{uid()}", f"b-{uid()}", f"agents/s-{uid()}"
    for session in ("sessions/x1", "sessions/x2"):
        await _ran(telemetry, a, agent, 1, session, uuid.uuid4().int >> 1)
        await _ran(telemetry, a, agent, 2, f"{session}-c", uuid.uuid4().int >> 1)
    # b has a session of the same id, on another version.
    await _ran(telemetry, b, agent, 3, "sessions/x1", uuid.uuid4().int >> 1)

    def score(session: str) -> pb.RecordScoreRequest:
        return pb.RecordScoreRequest(
            score=pb.Score(session=session, score_name="quality", value=0.9)
        )

    mine = await telemetry.api.RecordScore(score("sessions/x1"), metadata=who(a))
    assert mine.version == f"{agent}/versions/1"
    # b scores its own x1: pinned to b's version, not a's.
    theirs = await telemetry.api.RecordScore(score("sessions/x1"), metadata=who(b))
    assert theirs.version == f"{agent}/versions/3"
    # a's other session does not exist for b.
    err = await fails(
        grpc.StatusCode.NOT_FOUND,
        telemetry.api.RecordScore(score("sessions/x2"), metadata=who(b)),
    )
    assert "sessions/x2" in (err.details() or "")

    for tenant, expected in ((a, [mine.name]), (b, [theirs.name])):
        listed = await telemetry.api.ListScores(
            pb.ListScoresRequest(filter=pb.SpanFilter(session="sessions/x1")),
            metadata=who(tenant),
        )
        assert [s.name for s in listed.scores] == expected

    compare = pb.CompareVersionsRequest(
        agent=agent, baseline_version=f"{agent}/versions/1",
        candidate_version=f"{agent}/versions/2", start_time=_time(T0 - 1000 * MS),
        end_time=_time(T0 + 1000 * MS), metrics=[pb.MetricSpec(name="latency_p95")],
        min_sessions=1,
    )
    seen = await telemetry.analysis.CompareVersions(compare, metadata=who(a))
    assert (seen.comparisons[0].baseline.sessions, seen.comparisons[0].candidate.sessions) == (2, 2)
    blind = await telemetry.analysis.CompareVersions(compare, metadata=who(b))
    assert (blind.comparisons[0].baseline.sessions, blind.comparisons[0].candidate.sessions) == (
        0,
        0,
    )


@pytest_asyncio.fixture
async def evaluation(telemetry: Telemetry) -> AsyncIterator[Evaluation]:
    """The evaluation domain on the server's PostgreSQL (migrated by the server), for callers
    with roles of the test's choosing."""
    pool = await db.create_pool(telemetry.settings.require_database())
    sessions = SessionsClient(telemetry.settings.for_service("telemetry"))
    try:
        deliveries = Deliveries(PgDeliveryStore(pool), SystemClock())
        yield Evaluation(PgScoreStore(pool), PgSpanStore(pool), sessions, deliveries)
    finally:
        await sessions.close()
        await pool.close()


async def test_invokers_score_their_own_sessions_as_user_feedback(
    telemetry: Telemetry, evaluation: Evaluation
) -> None:
    tenant, agent = f"u-{uid()}", f"agents/f-{uid()}"
    await _ran(telemetry, tenant, agent, 1, "sessions/carols", uuid.uuid4().int >> 1, user="carol")

    def member(user: str, role: Role) -> Principal:
        return Principal(tenant=tenant, subject=user, roles=frozenset({role}))

    judged = ScoreInput(SessionRef("carols"), "quality", 0.4, source=ScoreSource.JUDGE)
    feedback = await evaluation.record_score(member("carol", Role.INVOKER), judged)
    assert (feedback.user, feedback.source) == ("carol", ScoreSource.USER)
    for other in (member("dave", Role.INVOKER), member("vera", Role.VIEWER)):
        with pytest.raises(PermissionDenied, match="may not change sessions/carols"):
            await evaluation.record_score(other, judged)
    by_operator = await evaluation.record_score(member("olga", Role.OPERATOR), judged)
    assert (by_operator.user, by_operator.source) == ("olga", ScoreSource.JUDGE)
    # Another tenant's operator: no such session.
    outsider = Principal(tenant=f"o-{uid()}", subject="olga", roles=frozenset({Role.ADMIN}))
    with pytest.raises(NotFound):
        await evaluation.record_score(outsider, judged)

    listed = await telemetry.api.ListScores(
        pb.ListScoresRequest(filter=pb.SpanFilter(session="sessions/carols")), metadata=who(tenant)
    )
    assert sorted((s.user, s.source) for s in listed.scores) == [
        ("carol", pb.SCORE_SOURCE_USER),
        ("olga", pb.SCORE_SOURCE_JUDGE),
    ]


async def test_a_session_is_scored_before_its_spans_arrive_but_only_in_its_tenant(
    telemetry: Telemetry,
) -> None:
    """A score right after an invocation: the session exists (sessions has it) while its spans
    are still on their way (exporters flush every 500 ms)."""
    tenant, agent = f"f-{uid()}", f"s-{uid()}"
    async with internal_channel(telemetry.settings, "sessions", "router") as channel:
        await sessions_pb2_grpc.SessionsServiceStub(channel).CreateSession(
            sessions_pb2.CreateSessionRequest(session_id="fresh", session=sessions_pb2.Session(
                agent=f"agents/{agent}", version=f"agents/{agent}/versions/2",
                version_digest="sha256:" + "0f" * 32, endpoint=f"agents/{agent}/endpoints/prod",
            )), metadata=who(tenant, "carol", "invoker"))

    def score(session: str) -> pb.RecordScoreRequest:
        return pb.RecordScoreRequest(score=pb.Score(session=session, score_name="quality", value=0.7))

    scored = await telemetry.api.RecordScore(score("sessions/fresh"), metadata=who(tenant))
    assert (scored.session, scored.version, scored.value) == (
        "sessions/fresh", f"agents/{agent}/versions/2", 0.7)
    listed = await telemetry.api.ListScores(
        pb.ListScoresRequest(filter=pb.SpanFilter(session="sessions/fresh")), metadata=who(tenant))
    assert [s.name for s in listed.scores] == [scored.name]
    # The session's owner scores it too, as user feedback; another invoker of the tenant may not.
    own = await telemetry.api.RecordScore(score("sessions/fresh"), metadata=who(tenant, "carol", "invoker"))
    assert own.source == pb.SCORE_SOURCE_USER
    await fails(grpc.StatusCode.PERMISSION_DENIED, telemetry.api.RecordScore(
        score("sessions/fresh"), metadata=who(tenant, "dave", "invoker")))
    # Another tenant has no session of that name; nobody has one that never was.
    for session, md in (("sessions/fresh", who(f"o-{uid()}")), ("sessions/never-was", who(tenant))):
        err = await fails(grpc.StatusCode.NOT_FOUND, telemetry.api.RecordScore(score(session), metadata=md))
        assert f"{session} not found" in (err.details() or "")
