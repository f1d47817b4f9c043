"""Telemetry's domain: OTLP spans turned into rows, the query filters and their validation,
opaque page tokens, and the queries themselves over a SpanStore."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as OtlpStatus

from services.common.errors import InvalidArgument

log = logging.getLogger(__name__)

AGENT_ATTR = "corral.agent"
VERSION_ATTR = "corral.version"
ENDPOINT_ATTR = "corral.endpoint"
SESSION_ATTR = "corral.session"
TENANT_ATTR = "corral.tenant"
INVOCATION_ATTR = "corral.invocation"
# On the executor's execute_tool spans: tool calls and their failures are counted by it.
TOOL_ATTR = "corral.tool.name"
OPERATION_ATTR = "gen_ai.operation.name"
INVOKE_AGENT = "invoke_agent"
SERVICE_NAME_ATTR = "service.name"

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STATUS = {
    OtlpStatus.STATUS_CODE_UNSET: "UNSET",
    OtlpStatus.STATUS_CODE_OK: "OK",
    OtlpStatus.STATUS_CODE_ERROR: "ERROR",
}
_SEGMENT = r"[^/\s]{1,128}"
_AGENT = re.compile(rf"^agents/({_SEGMENT})$")
_VERSION = re.compile(rf"^agents/({_SEGMENT})/versions/([1-9][0-9]{{0,17}})$")
_ENDPOINT = re.compile(rf"^agents/({_SEGMENT})/endpoints/({_SEGMENT})$")
_SESSION = re.compile(rf"^sessions/({_SEGMENT})$")
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_NAME_SHAPES = {
    "agent": (_AGENT, "agents/{agent}, e.g. agents/progress-report"),
    "version": (_VERSION, "agents/{agent}/versions/{n}, e.g. agents/progress-report/versions/2"),
    "endpoint": (
        _ENDPOINT,
        "agents/{agent}/endpoints/{endpoint}, e.g. agents/progress-report/endpoints/prod",
    ),
    "session": (_SESSION, "sessions/{session}, e.g. sessions/abc"),
}


@dataclass(frozen=True)
class SpanRow:
    """One stored span. Ids are lowercase hex; the Corral columns are resource names."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    kind: str
    start_time: datetime
    end_time: datetime
    duration_ms: float
    status: str  # UNSET, OK or ERROR
    status_message: str
    agent: str
    version: str
    endpoint: str
    session: str
    tenant: str
    invocation_id: str
    is_invocation: bool
    attributes: Mapping[str, Any]
    resource: Mapping[str, Any]


@dataclass(frozen=True)
class Conversion:
    rows: list[SpanRow]
    rejected: int
    reason: str


# ---- OTLP -> rows ------------------------------------------------------------------------------


def _clean(text: str) -> str:
    # PostgreSQL text and jsonb refuse NUL characters; a span carrying one must not fail the batch.
    return text.replace("\x00", "")


def any_value(value: AnyValue) -> Any:
    """An OTLP AnyValue as a JSON-ready Python value."""
    which = value.WhichOneof("value")
    if which == "string_value":
        return _clean(value.string_value)
    if which == "bool_value":
        return value.bool_value
    if which == "int_value":
        return value.int_value
    if which == "double_value":
        # JSON has no NaN or Infinity; keep what was sent, as text.
        return value.double_value if math.isfinite(value.double_value) else str(value.double_value)
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes_dict(value.kvlist_value.values)
    if which == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    return None


def attributes_dict(attributes: Sequence[KeyValue]) -> dict[str, Any]:
    return {_clean(kv.key): any_value(kv.value) for kv in attributes}


def _nanos_to_datetime(nanos: int) -> datetime:
    return _EPOCH + timedelta(microseconds=nanos // 1000)


def _text(attrs: Mapping[str, Any], resource: Mapping[str, Any], key: str) -> str:
    value = attrs.get(key)
    if value is None or value == "":
        value = resource.get(key)
    return "" if value is None else str(value)


def span_row(span: OtlpSpan, resource: Mapping[str, Any], default_tenant: str) -> SpanRow:
    """One OTLP span as a row. Corral columns come from the span's attributes, then the resource's;
    a span that names no tenant belongs to the tenant that exported it."""
    attrs = attributes_dict(span.attributes)
    end_nanos = max(span.end_time_unix_nano, span.start_time_unix_nano)
    return SpanRow(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        name=_clean(span.name),
        service=_text({}, resource, SERVICE_NAME_ATTR),
        kind=OtlpSpan.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_")
        if span.kind in OtlpSpan.SpanKind.values()
        else "UNSPECIFIED",
        start_time=_nanos_to_datetime(span.start_time_unix_nano),
        end_time=_nanos_to_datetime(end_nanos),
        duration_ms=(end_nanos - span.start_time_unix_nano) / 1_000_000,
        status=_STATUS.get(span.status.code, "UNSET"),
        status_message=_clean(span.status.message),
        agent=_text(attrs, resource, AGENT_ATTR),
        version=_text(attrs, resource, VERSION_ATTR),
        endpoint=_text(attrs, resource, ENDPOINT_ATTR),
        session=_text(attrs, resource, SESSION_ATTR),
        tenant=_text(attrs, resource, TENANT_ATTR) or default_tenant,
        invocation_id=_text(attrs, resource, INVOCATION_ATTR),
        is_invocation=attrs.get(OPERATION_ATTR) == INVOKE_AGENT,
        attributes=attrs,
        resource=resource,
    )


def rows_from_export(request: ExportTraceServiceRequest, default_tenant: str) -> Conversion:
    """Every span of an export as a row; spans whose ids are not the sizes OTLP requires (16-byte
    trace id, 8-byte span id) are rejected and counted, as OTLP's partial success expects."""
    rows: list[SpanRow] = []
    rejected = 0
    for resource_spans in request.resource_spans:
        resource = attributes_dict(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                if len(span.trace_id) != 16 or len(span.span_id) != 8:
                    rejected += 1
                    continue
                rows.append(span_row(span, resource, default_tenant))
    reason = (
        f"{rejected} span(s) rejected: trace_id must be 16 bytes and span_id 8 bytes"
        if rejected
        else ""
    )
    return Conversion(rows=rows, rejected=rejected, reason=reason)


# ---- filters -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpanFilter:
    """Empty fields match anything. Times select spans that start in [start_time, end_time)."""

    agent: str = ""
    version: str = ""
    endpoint: str = ""
    session: str = ""
    trace_id: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    errors_only: bool = False

    def validated(self, prefix: str = "filter.") -> SpanFilter:
        """This filter with a normalised trace id, or InvalidArgument naming the bad field."""
        for name, (pattern, shape) in _NAME_SHAPES.items():
            value = getattr(self, name)
            if value and not pattern.match(value):
                raise InvalidArgument.field(
                    prefix + name, f"{value!r} is not a resource name of the form {shape}"
                )
        agent = self.agent
        for name in ("version", "endpoint"):
            value = getattr(self, name)
            if agent and value and not value.startswith(agent + "/"):
                raise InvalidArgument.field(
                    prefix + name,
                    f"{value!r} does not belong to {prefix}agent {agent!r}; drop one of them",
                )
        trace_id = self.trace_id.lower()
        if trace_id and not _TRACE_ID.match(trace_id):
            raise InvalidArgument.field(
                prefix + "trace_id", f"{self.trace_id!r} is not a trace id (32 hex digits)"
            )
        check_window(self.start_time, self.end_time, prefix)
        return replace(self, trace_id=trace_id)


def check_window(start: datetime | None, end: datetime | None, prefix: str = "") -> None:
    if start is not None and end is not None and end < start:
        raise InvalidArgument.field(prefix + "end_time", "is before start_time; swap them")


def check_agent(agent: str, field: str = "agent") -> str:
    if not agent:
        raise InvalidArgument.field(
            field, "is required: name the agent, e.g. agents/progress-report"
        )
    if not _AGENT.match(agent):
        raise InvalidArgument.field(
            field,
            f"{agent!r} is not a resource name of the form agents/{{agent}}, e.g. agents/progress-report",
        )
    return agent


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument.field(
            "page_size", f"{requested} is negative; use 0 for the default ({DEFAULT_PAGE_SIZE})"
        )
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def version_number(version: str) -> int | None:
    match = _VERSION.match(version)
    return int(match.group(2)) if match else None


# ---- page tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """Where a page ended, in the newest-first order: start time, then trace id, then span id."""

    start_time: datetime
    trace_id: str
    span_id: str = ""


def _fingerprint(kind: str, tenant: str, span_filter: SpanFilter) -> str:
    # A token only continues the query it came from: same method, tenant and filter.
    text = repr((kind, tenant, astuple(span_filter)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_page_token(kind: str, tenant: str, span_filter: SpanFilter, cursor: Cursor) -> str:
    micros = (cursor.start_time - _EPOCH) // timedelta(microseconds=1)
    body = {
        "f": _fingerprint(kind, tenant, span_filter),
        "t": micros,
        "tr": cursor.trace_id,
        "s": cursor.span_id,
    }
    return (
        base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode())
        .decode()
        .rstrip("=")
    )


def decode_page_token(token: str, kind: str, tenant: str, span_filter: SpanFilter) -> Cursor | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        fingerprint, micros, trace_id, span_id = body["f"], body["t"], body["tr"], body["s"]
        if not (isinstance(micros, int) and isinstance(trace_id, str) and isinstance(span_id, str)):
            raise TypeError("wrong field types")
        start = _EPOCH + timedelta(microseconds=micros)
    except (binascii.Error, ValueError, TypeError, KeyError, OverflowError):
        raise InvalidArgument.field(
            "page_token",
            "is not a token this service issued; pass next_page_token unchanged or leave it empty",
        ) from None
    if fingerprint != _fingerprint(kind, tenant, span_filter):
        raise InvalidArgument.field(
            "page_token",
            "was issued for a different filter; repeat the request with the same filter or without a token",
        )
    return Cursor(start_time=start, trace_id=trace_id, span_id=span_id)


# ---- queries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceSummary:
    """One trace, summarised by its (first) invocation span."""

    trace_id: str
    root_span_name: str
    start_time: datetime
    duration_ms: float
    status: str
    agent: str
    version: str
    endpoint: str
    session: str
    span_count: int


@dataclass(frozen=True)
class VersionMetrics:
    version: str
    invocations: int
    errors: int
    sessions: int
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    tool_calls: int = 0
    tool_failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    # model id -> (input tokens, output tokens), for the cost.
    tokens_by_model: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    cost_usd: float = 0.0
    unpriced_models: tuple[str, ...] = ()

    @property
    def error_rate(self) -> float:
        return self.errors / self.invocations if self.invocations else 0.0

    @property
    def tool_failure_rate(self) -> float:
        return self.tool_failures / self.tool_calls if self.tool_calls else 0.0


@dataclass(frozen=True)
class SpanPage:
    spans: list[SpanRow]
    next_page_token: str


@dataclass(frozen=True)
class TracePage:
    traces: list[TraceSummary]
    next_page_token: str


@dataclass(frozen=True)
class ExportResult:
    accepted: int
    stored: int  # fewer than accepted when some spans were already stored
    rejected: int
    reason: str


class SpanStore(Protocol):
    async def insert_spans(self, rows: Sequence[SpanRow]) -> int: ...

    async def list_spans(
        self, tenant: str, span_filter: SpanFilter, after: Cursor | None, limit: int
    ) -> list[SpanRow]: ...

    async def list_traces(
        self, tenant: str, span_filter: SpanFilter, after: Cursor | None, limit: int
    ) -> list[TraceSummary]: ...

    async def version_metrics(
        self, tenant: str, agent: str, start: datetime | None, end: datetime | None
    ) -> list[VersionMetrics]: ...


class Telemetry:
    """Stores exported spans and answers the tenant-scoped queries over them."""

    def __init__(self, store: SpanStore, prices: Mapping[str, tuple[float, float]] | None = None) -> None:
        self._store = store
        # model id -> US dollars per million (input, output) tokens.
        self._prices = dict(prices or {})

    async def export(
        self, request: ExportTraceServiceRequest, *, default_tenant: str
    ) -> ExportResult:
        conversion = rows_from_export(request, default_tenant)
        stored = await self._store.insert_spans(conversion.rows) if conversion.rows else 0
        if conversion.rejected:
            log.warning("export: %s", conversion.reason)
        return ExportResult(len(conversion.rows), stored, conversion.rejected, conversion.reason)

    async def list_spans(
        self, tenant: str, span_filter: SpanFilter, size: int, token: str
    ) -> SpanPage:
        span_filter = span_filter.validated()
        limit = page_size(size)
        after = decode_page_token(token, "spans", tenant, span_filter)
        rows = await self._store.list_spans(tenant, span_filter, after, limit + 1)
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            cursor = Cursor(last.start_time, last.trace_id, last.span_id)
            next_token = encode_page_token("spans", tenant, span_filter, cursor)
        return SpanPage(rows, next_token)

    async def list_traces(
        self, tenant: str, span_filter: SpanFilter, size: int, token: str
    ) -> TracePage:
        span_filter = span_filter.validated()
        limit = page_size(size)
        after = decode_page_token(token, "traces", tenant, span_filter)
        traces = await self._store.list_traces(tenant, span_filter, after, limit + 1)
        next_token = ""
        if len(traces) > limit:
            traces = traces[:limit]
            last = traces[-1]
            next_token = encode_page_token(
                "traces", tenant, span_filter, Cursor(last.start_time, last.trace_id)
            )
        return TracePage(traces, next_token)

    async def version_metrics(
        self, tenant: str, agent: str, start: datetime | None, end: datetime | None
    ) -> list[VersionMetrics]:
        check_agent(agent)
        check_window(start, end)
        metrics = await self._store.version_metrics(tenant, agent, start, end)

        def order(m: VersionMetrics) -> tuple[int, float, str]:
            # versions/10 after versions/2; names that are not numbered (never validated on
            # ingest) go last, alphabetically.
            n = version_number(m.version)
            return (0, n, "") if n is not None else (1, 0, m.version)

        return sorted((self._priced(m) for m in metrics), key=order)

    def _priced(self, m: VersionMetrics) -> VersionMetrics:
        cost, unpriced = 0.0, []
        for model, (tokens_in, tokens_out) in sorted(m.tokens_by_model.items()):
            price = self._prices.get(model)
            if price is None:
                unpriced.append(model)
                continue
            cost += (tokens_in * price[0] + tokens_out * price[1]) / 1_000_000
        return replace(m, cost_usd=round(cost, 6), unpriced_models=tuple(unpriced))
