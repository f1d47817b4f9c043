"""corral.telemetry.v1.TelemetryService over gRPC: parses the names a request carries, calls the
span or the evaluation domain once, and answers with the messages of messages.py."""

from __future__ import annotations

from datetime import UTC, datetime

from corral.names import AgentRef, EndpointRef, SessionRef, VersionRef
from corral.telemetry.v1 import telemetry_pb2 as pb
from corral.telemetry.v1 import telemetry_pb2_grpc
from services.common import tenancy
from services.common.errors import InvalidArgument
from services.common.identity import caller
from services.common.interceptors import Context
from services.common.metric_protos import metric_from_pb
from services.common.timestamps import optional_time
from services.telemetry import messages, rules
from services.telemetry.delivery import Deliveries
from services.telemetry.evaluation import Evaluation
from services.telemetry.log_model import LogFilter
from services.telemetry.logs import AgentLogs
from services.telemetry.model import (
    AnalysisScope,
    ScoreFilter,
    ScoreInput,
    ScoreSource,
    SpanFilter,
    TenantScope,
    Variant,
    VersionComparison,
)
from services.telemetry.spans import Telemetry


def span_filter(f: pb.SpanFilter) -> SpanFilter:
    """A request's `filter`, its names parsed (a bad one is refused naming filter.<field>)."""
    prefix = "filter."
    return SpanFilter(
        agent=AgentRef.parse(f.agent, field=prefix + "agent") if f.agent else None,
        version=VersionRef.parse(f.version, field=prefix + "version") if f.version else None,
        endpoint=EndpointRef.parse(f.endpoint, field=prefix + "endpoint") if f.endpoint else None,
        session=SessionRef.parse(f.session, field=prefix + "session") if f.session else None,
        trace_id=f.trace_id,
        start_time=optional_time(f, "start_time", prefix + "start_time"),
        end_time=optional_time(f, "end_time", prefix + "end_time"),
        errors_only=f.errors_only,
    )


def _span_query(
    request: pb.ListSpansRequest | pb.ListTracesRequest, context: Context
) -> tuple[TenantScope, SpanFilter, int, str]:
    """What ListSpans and ListTraces ask the domain: the caller's tenant, the filter, the page."""
    return (
        tenancy.readable_tenant(caller(context), "spans"),
        span_filter(request.filter),
        request.page_size,
        request.page_token,
    )


def _scope(
    request: pb.CompareVersionsRequest | pb.AnalyzeExperimentRequest,
) -> AnalysisScope:
    endpoint = request.endpoint
    return AnalysisScope(
        agent=AgentRef.parse(request.agent, field="agent"),
        start=optional_time(request, "start_time"),
        end=optional_time(request, "end_time"),
        endpoint=EndpointRef.parse(endpoint, field="endpoint") if endpoint else None,
        metrics=[metric_from_pb(m) for m in request.metrics],
        alpha=request.alpha,
    )


class TelemetryServicer(telemetry_pb2_grpc.TelemetryServiceServicer):
    def __init__(
        self, telemetry: Telemetry, evaluation: Evaluation, logs: AgentLogs,
        deliveries: Deliveries,
    ) -> None:
        self._telemetry = telemetry
        self._evaluation = evaluation
        self._logs = logs
        self._deliveries = deliveries

    async def ListSpans(
        self, request: pb.ListSpansRequest, context: Context
    ) -> pb.ListSpansResponse:
        page = await self._telemetry.list_spans(*_span_query(request, context))
        return messages.spans_response(page)

    async def ListTraces(
        self, request: pb.ListTracesRequest, context: Context
    ) -> pb.ListTracesResponse:
        page = await self._telemetry.list_traces(*_span_query(request, context))
        return messages.traces_response(page)

    async def ListLogs(self, request: pb.ListLogsRequest, context: Context) -> pb.ListLogsResponse:
        where = LogFilter(
            agent=AgentRef.parse(request.agent, field="agent"),
            version=VersionRef.parse(request.version, field="version") if request.version else None,
            session=SessionRef.parse(request.session, field="session") if request.session else None,
            invocation_id=request.invocation_id,
            start_time=optional_time(request, "start_time"),
        )
        page = await self._logs.list_logs(
            tenancy.readable_tenant(caller(context), "logs"), where, request.page_size,
            request.page_token,
        )
        return messages.logs_response(page)

    async def GetVersionMetrics(
        self, request: pb.GetVersionMetricsRequest, context: Context
    ) -> pb.GetVersionMetricsResponse:
        metrics = await self._telemetry.version_metrics(
            tenancy.readable_tenant(caller(context), "metrics"),
            AgentRef.parse(request.agent, field="agent"),
            optional_time(request, "start_time"),
            optional_time(request, "end_time"),
        )
        return pb.GetVersionMetricsResponse(
            versions=[messages.version_metrics_pb(m) for m in metrics]
        )

    async def RecordScore(self, request: pb.RecordScoreRequest, context: Context) -> pb.Score:
        s = request.score
        score = ScoreInput(
            session=SessionRef.parse(s.session, field="score.session"),
            name=s.score_name,
            value=s.value,
            trace_id=s.trace_id,
            source=messages.SOURCE_FROM_PB.get(s.source, ScoreSource.HUMAN),
            comment=s.comment,
        )
        return messages.score_pb(await self._evaluation.record_score(caller(context), score))

    async def ListScores(
        self, request: pb.ListScoresRequest, context: Context
    ) -> pb.ListScoresResponse:
        # Scores are found by the session or version they were recorded on.
        f = span_filter(request.filter)
        if request.score_name and not rules.valid_score_name(request.score_name):
            raise InvalidArgument.field(
                "score_name", "a score name is 1-63 lowercase letters, digits, _ . - (e.g. accuracy)"
            )
        where = ScoreFilter(session=f.session, version=f.version, name=request.score_name)
        page = await self._evaluation.list_scores(
            caller(context), where, request.page_size, request.page_token
        )
        return pb.ListScoresResponse(
            scores=[messages.score_pb(s) for s in page.items], next_page_token=page.next_page_token
        )

    async def CompareVersions(
        self, request: pb.CompareVersionsRequest, context: Context
    ) -> pb.CompareVersionsResponse:
        comparison = VersionComparison(
            scope=_scope(request),
            baseline=VersionRef.parse(request.baseline_version, field="baseline_version"),
            candidate=VersionRef.parse(request.candidate_version, field="candidate_version"),
            min_sessions=request.min_sessions,
        )
        result = await self._evaluation.compare(caller(context), comparison)
        return messages.comparison_response(result, comparison, datetime.now(UTC))

    async def AnalyzeExperiment(
        self, request: pb.AnalyzeExperimentRequest, context: Context
    ) -> pb.AnalyzeExperimentResponse:
        variants = [
            Variant(VersionRef.parse(v.version, field=f"variants[{i}].version"), v.percent)
            for i, v in enumerate(request.variants)
        ]
        result = await self._evaluation.analyze_experiment(
            caller(context), _scope(request), variants
        )
        return messages.experiment_response(result, variants)

    async def ReportDelivery(
        self, request: pb.ReportDeliveryRequest, context: Context
    ) -> pb.ReportDeliveryResponse:
        await self._deliveries.report(messages.delivery_report(request))
        return pb.ReportDeliveryResponse()
