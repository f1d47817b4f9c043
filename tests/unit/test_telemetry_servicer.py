"""Telemetry's edges without a socket: the servicers parse the names a request carries once, at
the boundary, refusing a bad one by its request field, and convert answers back to protos."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import cast

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from corral.names import ResourceNameError
from corral.telemetry.v1 import telemetry_pb2 as pb
from services.common import identity
from services.common.auth.principal import Principal, Role
from services.common.clock import SystemClock
from services.common.interceptors import Context
from services.telemetry.delivery import Deliveries
from services.telemetry.evaluation import Evaluation
from services.telemetry.logs import AgentLogs
from services.telemetry.metrics import TelemetryMetrics
from services.telemetry.receiver import SpanReceiver
from services.telemetry.servicer import TelemetryServicer
from services.telemetry.spans import Telemetry
from services.telemetry.trace_servicer import TraceServicer
from tests.fakes.telemetry import (
    FakeDeliveryStore,
    FakeLogStore,
    FakeScoreStore,
    FakeSessionDirectory,
    FakeSpanStore,
)
from tests.otlp import export_request


@contextmanager
def acting_in(tenant: str) -> Iterator[None]:
    """What the authentication interceptor does before a handler runs: the verified principal
    (here an operator of `tenant`) is the call's caller."""
    principal = Principal(tenant=tenant, subject="alice", roles=frozenset({Role.OPERATOR}))
    token = identity.enter(identity.Verified(principal))
    try:
        yield
    finally:
        identity.leave(token)


@pytest.fixture(autouse=True)
def _acme_operator() -> Iterator[None]:
    with acting_in("acme"):
        yield


def servicers() -> tuple[TelemetryServicer, TraceServicer]:
    spans, scores = FakeSpanStore(), FakeScoreStore()
    telemetry = Telemetry(spans, scores)
    deliveries = Deliveries(FakeDeliveryStore(), SystemClock())
    evaluation = Evaluation(scores, spans, FakeSessionDirectory(), deliveries)
    servicer = TelemetryServicer(telemetry, evaluation, AgentLogs(FakeLogStore()), deliveries)
    return servicer, TraceServicer(
        SpanReceiver(telemetry, TelemetryMetrics())
    )


Call = Callable[[TelemetryServicer], Awaitable[object]]
CTX = cast(Context, object())  # the servicers read the caller from the interceptor's context


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.GetVersionMetrics(pb.GetVersionMetricsRequest(), CTX), "agent"),
        (
            lambda s: s.GetVersionMetrics(
                pb.GetVersionMetricsRequest(agent="progress-report"), CTX
            ),
            "agent",
        ),
        (
            lambda s: s.ListSpans(pb.ListSpansRequest(filter=pb.SpanFilter(agent="agents/A")), CTX),
            "filter.agent",
        ),
        (
            lambda s: s.ListTraces(pb.ListTracesRequest(filter=pb.SpanFilter(session="s")), CTX),
            "filter.session",
        ),
        (
            lambda s: s.RecordScore(pb.RecordScoreRequest(score=pb.Score(session="abc")), CTX),
            "score.session",
        ),
        (
            lambda s: s.ListScores(
                pb.ListScoresRequest(filter=pb.SpanFilter(version="agents/a/versions/x")), CTX
            ),
            "filter.version",
        ),
        (
            lambda s: s.CompareVersions(
                pb.CompareVersionsRequest(
                    agent="agents/a", baseline_version="v1", candidate_version="agents/a/versions/2"
                ),
                CTX,
            ),
            "baseline_version",
        ),
        (
            lambda s: s.CompareVersions(
                pb.CompareVersionsRequest(
                    agent="a",
                    baseline_version="agents/a/versions/1",
                    candidate_version="agents/a/versions/2",
                ),
                CTX,
            ),
            "agent",
        ),
        (
            lambda s: s.AnalyzeExperiment(
                pb.AnalyzeExperimentRequest(
                    agent="agents/a",
                    variants=[
                        pb.ExperimentVariant(version="agents/a/versions/1", percent=50),
                        pb.ExperimentVariant(version="agents/a/versions/0", percent=50),
                    ],
                ),
                CTX,
            ),
            "variants[1].version",
        ),
        (
            lambda s: s.AnalyzeExperiment(
                pb.AnalyzeExperimentRequest(agent="agents/a", endpoint="prod"), CTX
            ),
            "endpoint",
        ),
    ],
)
async def test_bad_names_are_refused_naming_their_field(call: Call, field: str) -> None:
    telemetry, _ = servicers()
    with pytest.raises(ResourceNameError) as err:
        await call(telemetry)
    assert err.value.field == field


async def test_exported_spans_come_back_as_protos_for_the_exporting_tenant_only() -> None:
    telemetry, trace = servicers()
    attributes = [
        KeyValue(key="gen_ai.operation.name", value=AnyValue(string_value="invoke_agent")),
        KeyValue(key="corral.session", value=AnyValue(string_value="sessions/s1")),
        KeyValue(key="tokens", value=AnyValue(int_value=12)),
    ]
    spans = [
        Span(
            trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="invoke_agent a", attributes=attributes
        ),
        Span(trace_id=b"short", span_id=b"\x03" * 8, name="broken"),
    ]
    response = await trace.Export(export_request(spans), CTX)
    assert response.partial_success.rejected_spans == 1

    query = pb.ListSpansRequest(filter=pb.SpanFilter(session="sessions/s1"))
    [span] = (await telemetry.ListSpans(query, CTX)).spans
    assert (span.trace_id, span.span_id, span.tenant) == ("01" * 16, "02" * 8, "acme")
    assert span.status == pb.SPAN_STATUS_UNSPECIFIED
    assert span.attributes["tokens"] == 12
    traces = await telemetry.ListTraces(pb.ListTracesRequest(), CTX)
    assert [(t.root_span_name, t.span_count) for t in traces.traces] == [("invoke_agent a", 1)]
    with acting_in("beta"):
        other = await telemetry.ListSpans(query, CTX)
    assert list(other.spans) == []
