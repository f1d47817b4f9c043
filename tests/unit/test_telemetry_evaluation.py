"""Telemetry's evaluation domain against a fake store: recording and listing scores, and the
rules CompareVersions and AnalyzeExperiment apply before any statistics run."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from corral.names import AgentRef, EndpointRef, SessionRef, VersionRef
from services.common.auth.principal import Role
from services.common.clock import SystemClock
from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.common.identity import Caller
from services.telemetry import messages
from services.telemetry.analysis import SessionObservation, Verdict
from services.telemetry.delivery import Deliveries
from services.telemetry.evaluation import Evaluation
from services.telemetry.model import (
    AnalysisScope,
    MetricRequest,
    ObservationQuery,
    RecordedSession,
    ScoreFilter,
    ScoreInput,
    ScoreSource,
    SpanRow,
    SpanStatus,
    Variant,
    VersionComparison,
)
from tests.fakes.telemetry import (
    FakeDeliveryStore,
    FakeScoreStore,
    FakeSessionDirectory,
    FakeSpanStore,
)

# An operator of acme (scores any session of the tenant, with the source it names).
ALICE = Caller("acme", "alice", frozenset({Role.OPERATOR}))
BETA = Caller("beta", "bob", frozenset({Role.ADMIN}))
NOW = datetime(2025, 6, 1, tzinfo=UTC)
START = NOW - timedelta(hours=1)
AGENT = AgentRef("a")
V1, V2, V3 = (AGENT.version(n) for n in (1, 2, 3))
SCOPE = AnalysisScope(AGENT, START, NOW)


def ran(
    spans: FakeSpanStore, tenant: str, session: str, version: VersionRef, trace: str,
    user: str = "carol",
) -> None:
    """An invocation of `version` in `session` for `user`, through the prod endpoint, as trace
    `trace`."""
    row = SpanRow(
        trace_id=trace,
        span_id="01" * 8,
        parent_span_id="",
        name=f"invoke_agent {version.agent}",
        service="corral-executor",
        kind="SERVER",
        start_time=NOW + timedelta(seconds=version.number),
        end_time=NOW + timedelta(seconds=version.number),
        duration_ms=0.0,
        status=SpanStatus.UNSET,
        status_message="",
        agent=version.parent.name,
        version=version.name,
        endpoint=version.parent.endpoint("prod").name,
        session=session,
        tenant=tenant,
        invocation_id="inv-1",
        is_invocation=True,
        attributes={"corral.user": user},
        resource={},
    )
    spans.put(row)


def evaluation(sessions: FakeSessionDirectory | None = None) -> tuple[Evaluation, FakeScoreStore]:
    scores, spans = FakeScoreStore(), FakeSpanStore()
    ran(spans, "acme", "sessions/s1", V1, "t0")
    ran(spans, "acme", "sessions/s1", V2, "t1")  # the newer: the session now runs V2
    deliveries = Deliveries(FakeDeliveryStore(), SystemClock())
    return Evaluation(scores, spans, sessions or FakeSessionDirectory(), deliveries), scores


def score(**fields: Any) -> ScoreInput:
    """A score of sessions/s1, with `fields` changed."""
    return replace(ScoreInput(SessionRef("s1"), "quality", 0.8), **fields)


async def test_a_score_is_pinned_to_the_version_its_session_ran() -> None:
    domain, store = evaluation()
    stored = await domain.record_score(ALICE, score(trace_id="t1", comment="fine"))
    assert (stored.session, stored.version, stored.endpoint) == (
        "sessions/s1",
        V2.name,
        "agents/a/endpoints/prod",
    )
    assert (stored.tenant, stored.user, stored.resource_name) == ("acme", "alice", "scores/1")
    assert store.scores == [stored]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": "Quality Score"}, "score.score_name"),
        ({"value": 1.5}, "score.value"),
        ({"value": float("nan")}, "score.value"),
        ({"comment": "x" * 4001}, "score.comment"),
    ],
)
async def test_bad_scores_name_their_field(fields: dict[str, object], field: str) -> None:
    domain, store = evaluation()
    with pytest.raises(InvalidArgument) as err:
        await domain.record_score(ALICE, score(**fields))
    assert err.value.violations[0].field == field
    assert store.scores == []


async def test_scores_only_on_sessions_and_traces_that_ran_in_the_tenant() -> None:
    domain, _ = evaluation()
    for caller, fields, expected in (
        (ALICE, {"session": SessionRef("never-ran")}, "sessions/never-ran"),
        (BETA, {}, "sessions/s1"),
        (ALICE, {"trace_id": "t9"}, "trace t9"),
    ):
        with pytest.raises(NotFound) as err:
            await domain.record_score(caller, score(**fields))
        assert expected in err.value.message


async def test_a_session_without_spans_yet_is_scored_on_the_pin_sessions_recorded() -> None:
    directory = FakeSessionDirectory()
    directory.record(RecordedSession("acme", "carol", AGENT.name, V3.name, "agents/a/endpoints/prod"),
                     "fresh")
    domain, store = evaluation(directory)
    fresh = SessionRef("fresh")
    stored = await domain.record_score(ALICE, score(session=fresh))
    assert (stored.session, stored.version, stored.endpoint) == (
        "sessions/fresh", V3.name, "agents/a/endpoints/prod")
    # Its owner, the same rules as for a session with spans: their own, as user feedback.
    carol = Caller("acme", "carol", frozenset({Role.INVOKER}))
    assert (await domain.record_score(carol, score(session=fresh))).source is ScoreSource.USER
    with pytest.raises(PermissionDenied):
        await domain.record_score(Caller("acme", "dave", frozenset({Role.INVOKER})), score(session=fresh))
    with pytest.raises(NotFound, match="sessions/fresh"):
        await domain.record_score(BETA, score(session=fresh))
    assert len(store.scores) == 2


async def test_an_invoker_scores_only_its_own_sessions_and_as_user_feedback() -> None:
    domain, store = evaluation()  # sessions/s1 ran for carol
    carol = Caller("acme", "carol", frozenset({Role.INVOKER}))
    stored = await domain.record_score(carol, score(source=ScoreSource.JUDGE))
    assert (stored.user, stored.source) == ("carol", ScoreSource.USER)
    for other in (
        Caller("acme", "dave", frozenset({Role.INVOKER})),
        Caller("acme", "vera", frozenset({Role.VIEWER})),
    ):
        with pytest.raises(PermissionDenied, match="may not change sessions/s1"):
            await domain.record_score(other, score())
    # An operator scores anyone's session, with the source it names.
    judged = await domain.record_score(ALICE, score(source=ScoreSource.JUDGE))
    assert (judged.user, judged.source) == ("alice", ScoreSource.JUDGE)
    assert [s.id for s in store.scores] == [stored.id, judged.id]


async def test_scores_are_listed_newest_first_in_pages_bound_to_their_filter() -> None:
    domain, store = evaluation()
    for value in (0.1, 0.2, 0.3):
        await domain.record_score(ALICE, score(value=value))
    store.now += timedelta(seconds=1)
    await domain.record_score(ALICE, score(value=0.4, name="speed"))
    where = ScoreFilter(session=SessionRef("s1"))
    first = await domain.list_scores(ALICE, where, 3, "")
    assert [s.value for s in first.items] == [0.4, 0.3, 0.2]
    rest = await domain.list_scores(ALICE, where, 3, first.next_page_token)
    assert ([s.value for s in rest.items], rest.next_page_token) == ([0.1], "")
    by_name = await domain.list_scores(ALICE, replace(where, name="speed"), 0, "")
    assert [s.value for s in by_name.items] == [0.4]
    assert (await domain.list_scores(BETA, where, 0, "")).items == []
    for caller, other in ((ALICE, ScoreFilter(version=V2)), (BETA, where)):
        with pytest.raises(InvalidArgument) as err:
            await domain.list_scores(caller, other, 3, first.next_page_token)
        assert err.value.violations[0].field == "page_token"


def comparison(**fields: Any) -> VersionComparison:
    return replace(VersionComparison(SCOPE, V1, V2), **fields)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (comparison(baseline=AgentRef("b").version(1)), "baseline_version"),
        (comparison(candidate=AgentRef("b").version(2)), "candidate_version"),
        (comparison(candidate=V1), "candidate_version"),
        (comparison(scope=replace(SCOPE, end=None)), "start_time"),
        (comparison(scope=replace(SCOPE, end=SCOPE.start)), "start_time"),
        (comparison(scope=replace(SCOPE, endpoint=EndpointRef("b", "prod"))), "endpoint"),
        (comparison(scope=replace(SCOPE, alpha=1.5)), "alpha"),
        (comparison(min_sessions=-1), "min_sessions"),
        (comparison(scope=replace(SCOPE, metrics=[MetricRequest("nope")])), "metrics[0].name"),
        (
            comparison(scope=replace(SCOPE, metrics=[MetricRequest("score:Bad")])),
            "metrics[0].name",
        ),
        (
            comparison(scope=replace(SCOPE, metrics=[MetricRequest("latency_p95")] * 2)),
            "metrics",
        ),
    ],
)
async def test_bad_comparisons_name_their_field(request_: VersionComparison, field: str) -> None:
    domain, store = evaluation()
    with pytest.raises(InvalidArgument) as err:
        await domain.compare(ALICE, request_)
    assert err.value.violations[0].field == field
    assert store.observation_queries == [], "refused before reading anything"


async def test_a_comparison_reads_both_versions_over_the_window() -> None:
    domain, store = evaluation()
    sessions = [SessionObservation(invocations=1) for _ in range(5)]
    store.observed = {V1.name: sessions, V2.name: sessions}
    endpoint = AGENT.endpoint("prod")
    scope = replace(
        SCOPE,
        endpoint=endpoint,
        metrics=[MetricRequest("session_error_rate"), MetricRequest("score:q")],
    )
    result = await domain.compare(ALICE, VersionComparison(scope, V1, V2, min_sessions=2))
    assert [c.metric for c in result.comparisons] == ["session_error_rate", "score:q"]
    assert result.verdict is not Verdict.FAIL
    assert store.observation_queries == [
        ObservationQuery("acme", V1, START, NOW, endpoint, ("q",)),
        ObservationQuery("acme", V2, START, NOW, endpoint, ("q",)),
    ]


def experiment(
    *variants: Variant, scope: AnalysisScope = SCOPE
) -> Callable[[Evaluation], Awaitable[object]]:
    return lambda domain: domain.analyze_experiment(ALICE, scope, variants)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (experiment(Variant(V1, 50)), "variants"),
        (experiment(Variant(V1, 50), Variant(AgentRef("b").version(2), 50)), "variants[1].version"),
        (experiment(Variant(V1, 50), Variant(V2, 0)), "variants[1].percent"),
        (experiment(Variant(V1, 50), Variant(V1, 50)), "variants"),
        (
            experiment(Variant(V1, 50), Variant(V2, 50), scope=replace(SCOPE, start=None)),
            "start_time",
        ),
        (experiment(Variant(V1, 50), Variant(V2, 50), scope=replace(SCOPE, alpha=2.0)), "alpha"),
    ],
)
async def test_bad_experiments_name_their_field(
    call: Callable[[Evaluation], Awaitable[object]], field: str
) -> None:
    domain, _ = evaluation()
    with pytest.raises(InvalidArgument) as err:
        await call(domain)
    assert err.value.violations[0].field == field


async def test_an_experiment_counts_each_variants_sessions_against_the_first() -> None:
    domain, store = evaluation()
    store.observed = {
        V1.name: [SessionObservation(invocations=1)] * 6,
        V2.name: [SessionObservation(invocations=1)] * 3,
        V3.name: [SessionObservation(invocations=1)] * 4,
    }
    result = await domain.analyze_experiment(
        ALICE, SCOPE, [Variant(V3, 40), Variant(V1, 30), Variant(V2, 30)]
    )
    assert dict(result.sample_ratio.observed) == {V3.name: 4, V1.name: 6, V2.name: 3}
    assert result.control == V3.name


async def test_a_variant_without_sessions_reports_no_effect_and_is_not_the_control() -> None:
    domain, store = evaluation()
    store.observed = {V1.name: [SessionObservation(invocations=1)] * 6, V2.name: []}
    variants = [Variant(V1, 50), Variant(V2, 50)]
    response = messages.experiment_response(
        await domain.analyze_experiment(ALICE, SCOPE, variants), variants)
    for metric in response.metrics:
        control, empty = metric.variants
        assert control.control and not empty.control, metric.metric.name
        assert math.isnan(empty.estimate) and math.isnan(empty.effect), metric.metric.name
