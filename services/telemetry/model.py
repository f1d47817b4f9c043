"""Telemetry's domain values (spans, traces, per-version metrics, scores, comparisons) and the
seams it is built on: the span store, the score store and the fleet-wide metrics reader."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from corral.names import AgentRef, EndpointRef, SessionRef, VersionRef
from services.common.metric_spec import MetricSpec
from services.common.paging import Key
from services.telemetry.analysis import SessionObservation

# The span attributes Corral's executor sets, by which spans are found and counted.
AGENT_ATTR = "corral.agent"
VERSION_ATTR = "corral.version"
ENDPOINT_ATTR = "corral.endpoint"
SESSION_ATTR = "corral.session"
TENANT_ATTR = "corral.tenant"
INVOCATION_ATTR = "corral.invocation"
# The user an invocation ran for: whose session it is, for the score rules.
USER_ATTR = "corral.user"
# On the executor's execute_tool spans: tool calls and their failures are counted by it.
TOOL_ATTR = "corral.tool.name"
MODEL_ATTR = "gen_ai.request.model"
INPUT_TOKENS_ATTR = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS_ATTR = "gen_ai.usage.output_tokens"

# A metric as a caller asks for it; analysis.MetricSpec is the metric with its defaults filled in.
MetricRequest = MetricSpec
# What span attributes hold once converted from OTLP: JSON values.
JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]
Attributes = Mapping[str, JsonValue]
# Whose data a read covers: one tenant, or every tenant (None) for a service acting for all.
TenantScope = str | None


class SpanStatus(enum.StrEnum):
    UNSET = "UNSET"  # OTLP's default: the instrumentation said neither OK nor ERROR
    OK = "OK"
    ERROR = "ERROR"


@dataclass(frozen=True)
class SpanEvent:
    """Something that happened during a span: an exception (OpenTelemetry's `exception` event,
    with exception.type, .message and .stacktrace), a score, a redaction."""

    name: str
    time: datetime
    attributes: Attributes


@dataclass(frozen=True)
class SpanRow:
    """One stored span. Ids are lowercase hex; the Corral columns hold the resource names the
    exporter sent (the platform's as sent; a tenant's principal's normalised, see otlp.py)."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    kind: str
    start_time: datetime
    end_time: datetime
    duration_ms: float
    status: SpanStatus
    status_message: str
    agent: str
    version: str
    endpoint: str
    session: str
    tenant: str
    invocation_id: str
    is_invocation: bool
    attributes: Attributes
    resource: Attributes
    # Exported by the platform (a Corral service), not by a tenant's principal: only these count
    # in metrics and rollout analysis.
    platform: bool = True
    events: tuple[SpanEvent, ...] = ()


@dataclass(frozen=True)
class SpanFilter:
    """Unset fields match anything. Times select spans that start in [start_time, end_time)."""

    agent: AgentRef | None = None  # a version or endpoint filtered on must be of this agent
    version: VersionRef | None = None
    endpoint: EndpointRef | None = None
    session: SessionRef | None = None
    trace_id: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    errors_only: bool = False


@dataclass(frozen=True)
class TraceSummary:
    """One trace, summarised by its (first) invocation span."""

    trace_id: str
    root_span_name: str
    start_time: datetime
    duration_ms: float
    status: SpanStatus
    agent: str
    version: str
    endpoint: str
    session: str
    span_count: int


@dataclass(frozen=True)
class UsageCounts:
    """What a version did: invocations (and the failed ones), the sessions that invoked it, tool
    calls through the broker (and the failed ones), model tokens."""

    invocations: int = 0
    errors: int = 0
    sessions: int = 0
    tool_calls: int = 0
    tool_failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.invocations if self.invocations else 0.0

    @property
    def tool_failure_rate(self) -> float:
        return self.tool_failures / self.tool_calls if self.tool_calls else 0.0


@dataclass(frozen=True)
class Latency:
    """Invocation latency quantiles in milliseconds; zeros when no invocation was seen."""

    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0


@dataclass(frozen=True)
class VersionMetrics:
    version: str
    counts: UsageCounts
    latency: Latency
    # model id -> (input tokens, output tokens), for the cost.
    tokens_by_model: Mapping[str, tuple[int, int]] = field(
        default_factory=dict[str, tuple[int, int]]
    )
    cost_usd: float = 0.0
    unpriced_models: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExportBatch:
    """An OTLP export as the domain stores it: its well-formed spans, the scores its spans carried
    as events, and how many spans were rejected (and why)."""

    rows: Sequence[SpanRow]
    scores: Sequence[NewScore]
    rejected: int = 0
    reason: str = ""


@dataclass(frozen=True)
class ExportResult:
    accepted: int
    # Fewer than accepted when some spans were already stored, or log records went over their
    # invocation's bound.
    stored: int
    rejected: int
    reason: str


# -- scores and comparisons ----------------------------------------------------------------------


class ScoreSource(enum.StrEnum):
    HUMAN = "HUMAN"
    JUDGE = "JUDGE"
    CODE = "CODE"
    USER = "USER"


@dataclass(frozen=True)
class ScoreInput:
    """A score as a caller sends it; telemetry fills in the rest from the session."""

    session: SessionRef
    name: str
    value: float  # in [0, 1]
    trace_id: str = ""
    source: ScoreSource = ScoreSource.HUMAN
    comment: str = ""


@dataclass(frozen=True)
class NewScore:
    """A score ready to store: the session's agent, version and endpoint filled in."""

    session: str  # as the session's spans name it
    trace_id: str
    name: str
    value: float
    source: ScoreSource
    comment: str
    agent: str
    version: str
    endpoint: str
    tenant: str
    user: str


@dataclass(frozen=True)
class Score(NewScore):
    id: int
    create_time: datetime

    @property
    def resource_name(self) -> str:
        return f"scores/{self.id}"


@dataclass(frozen=True)
class ScoreFilter:
    """Unset fields match anything."""

    session: SessionRef | None = None
    version: VersionRef | None = None
    name: str = ""


@dataclass(frozen=True)
class AnalysisScope:
    """What a comparison or an experiment analyses: the sessions of an agent's versions with an
    invocation in [start, end) (only those routed through `endpoint` when set), by `metrics` (none:
    the defaults), at significance `alpha`."""

    agent: AgentRef
    start: datetime | None
    end: datetime | None
    endpoint: EndpointRef | None = None
    metrics: Sequence[MetricRequest] = ()
    alpha: float = 0.0  # 0: the default


@dataclass(frozen=True)
class VersionComparison:
    scope: AnalysisScope
    baseline: VersionRef
    candidate: VersionRef
    min_sessions: int = 0  # 0: the default


@dataclass(frozen=True)
class Variant:
    version: VersionRef
    percent: float  # its configured share of new sessions


@dataclass(frozen=True)
class ObservationQuery:
    """The sessions of one version with an invocation in [start, end) (through `endpoint` only,
    when set), with the means of the scores named."""

    tenant: TenantScope
    version: VersionRef
    start: datetime
    end: datetime
    endpoint: EndpointRef | None
    score_names: tuple[str, ...]


class SpanStore(Protocol):
    """Listings are newest first; `after` is the keyset position of the previous page's last row:
    (start_time, trace_id, span_id) for spans, (start_time, trace_id) for traces."""

    async def insert_spans(self, rows: Sequence[SpanRow]) -> int:
        """Stores the rows, skipping those already stored; returns how many were new."""
        ...

    async def list_spans(
        self, tenant: TenantScope, where: SpanFilter, after: Key | None, limit: int
    ) -> list[SpanRow]: ...

    async def list_traces(
        self, tenant: TenantScope, where: SpanFilter, after: Key | None, limit: int
    ) -> list[TraceSummary]: ...

    async def version_metrics(
        self, tenant: TenantScope, agent: AgentRef, start: datetime | None, end: datetime | None
    ) -> list[VersionMetrics]:
        """Per version of `agent` (unpriced, in no particular order)."""
        ...

    async def newest_invocation(self, tenant: str, session: SessionRef) -> SpanRow | None:
        """The session's newest invocation span: the agent, version and endpoint it ran on."""
        ...

    async def has_trace(self, tenant: str, session: SessionRef, trace_id: str) -> bool:
        """Whether `trace_id` is a trace of the session's."""
        ...


class ScoreStore(Protocol):
    """Scores are listed newest first; `after` is the position (create_time, id) of the previous
    page's last score."""

    async def insert_score(self, score: NewScore) -> Score: ...

    async def list_scores(
        self, tenant: TenantScope, where: ScoreFilter, after: Key | None, limit: int
    ) -> list[Score]: ...

    async def observations(self, query: ObservationQuery) -> list[SessionObservation]:
        """One observation per session of the query's tenant(s), in the order the sessions
        started."""
        ...


@dataclass(frozen=True)
class RecordedSession:
    """A session as the sessions service records it: its owner and what it is pinned to."""

    tenant: str
    user: str
    agent: str
    version: str
    endpoint: str


class SessionDirectory(Protocol):
    """The sessions service, asked about a session telemetry has no spans of (yet)."""

    async def find_session(self, tenant: str, session: SessionRef) -> RecordedSession | None:
        """`tenant`'s session of that name, or None when the tenant has none."""
        ...

