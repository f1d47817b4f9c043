"""OTLP → telemetry's domain: an ExportTraceServiceRequest as span rows and the scores its spans
carry as gen_ai.evaluation.result events.

Who exported decides what a span may claim. The platform's own spans (a Corral service's, above
all the executor's invocation spans) keep the tenant, agent and version they name: they are what
metrics and rollout analysis count. Anyone else's spans belong to the exporter's tenant whatever
they say, name agent and version in short or full form (normalised here), and never count as the
platform's invocations. Attribute sizes are bounded for every exporter."""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeAlias, TypeVar

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as OtlpStatus

from services.common.auth.principal import DEFAULT_TENANT, Principal
from services.telemetry import rules
from services.telemetry.model import (
    AGENT_ATTR,
    ENDPOINT_ATTR,
    INVOCATION_ATTR,
    SESSION_ATTR,
    TENANT_ATTR,
    VERSION_ATTR,
    Attributes,
    ExportBatch,
    JsonValue,
    NewScore,
    ScoreSource,
    SpanEvent,
    SpanRow,
    SpanStatus,
)

log = logging.getLogger(__name__)

OPERATION_ATTR = "gen_ai.operation.name"
INVOKE_AGENT = "invoke_agent"
SERVICE_NAME_ATTR = "service.name"
# Scores an agent records with corral.sdk's ctx.score travel as these span events.
EVALUATION_EVENT = "gen_ai.evaluation.result"
SCORE_NAME_ATTR = "gen_ai.evaluation.name"
SCORE_VALUE_ATTR = "gen_ai.evaluation.score.value"
SCORE_EXPLANATION_ATTR = "gen_ai.evaluation.explanation"
# Who recorded a score that arrived in an export.
EXPORTED_BY = "agent"

# Bounds on what one span may carry: longer strings are cut, extra items and attributes dropped.
MAX_ATTRIBUTES = 128
MAX_ITEMS = 128
MAX_KEY_CHARS = 256
MAX_VALUE_CHARS = 4096
# A span's (or a resource's) attributes in all, keys and values (a number or bool counts 8), and
# how deep arrays and key-value lists may nest: what is past either is left out.
MAX_ATTRIBUTE_CHARS = 64 * 1024
MAX_DEPTH = 4
# How many of a span's events are kept (the first ones): each is bounded as a span's attributes.
MAX_EVENTS = 32
# How many of a span's attributes were left out by the bounds above, when any were.
DROPPED_ATTR = "corral.attributes_dropped"
_CUT = "…"
_SCALAR_CHARS = 8

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Exporter:
    """Who sent an export: the platform (trusted) or a tenant's principal."""

    # The tenant of spans that name none and, for an untrusted exporter, of every span.
    tenant: str
    # A Corral service: its spans' own tenant, agent and version stand, and invocations count.
    trusted: bool
    # Who recorded the scores the spans carry.
    user: str = EXPORTED_BY

    @classmethod
    def of(cls, principal: Principal) -> Exporter:
        """A Corral service (the platform) is trusted; anyone else exports into its own tenant,
        as itself."""
        if principal.is_service:
            return cls(principal.tenant or DEFAULT_TENANT, trusted=True)
        return cls(principal.tenant, trusted=False, user=principal.subject)
_STATUS = {
    OtlpStatus.STATUS_CODE_UNSET: SpanStatus.UNSET,
    OtlpStatus.STATUS_CODE_OK: SpanStatus.OK,
    OtlpStatus.STATUS_CODE_ERROR: SpanStatus.ERROR,
}


def clean_text(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    # PostgreSQL text and jsonb refuse NUL characters; a span carrying one must not fail the batch.
    text = text.replace("\x00", "")
    return text if len(text) <= limit else text[: limit - 1] + _CUT


class _Budget:
    """What is left of MAX_ATTRIBUTE_CHARS for one span's attributes."""

    def __init__(self) -> None:
        self.left = MAX_ATTRIBUTE_CHARS

    def text(self, text: str, limit: int = MAX_VALUE_CHARS) -> str:
        kept = clean_text(text, max(1, min(limit, self.left)))
        self.left -= len(kept)
        return kept


def _any_value(value: AnyValue, budget: _Budget, depth: int) -> JsonValue:
    which = value.WhichOneof("value")
    if which == "string_value":
        return budget.text(value.string_value)
    if which == "bytes_value":
        return budget.text(base64.b64encode(value.bytes_value[:MAX_VALUE_CHARS]).decode("ascii"))
    if which in ("array_value", "kvlist_value") and depth >= MAX_DEPTH:
        return budget.text(_CUT)
    if which == "array_value":
        items: list[JsonValue] = []
        for item in value.array_value.values[:MAX_ITEMS]:
            if budget.left <= 0:
                break
            items.append(_any_value(item, budget, depth + 1))
        return items
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values, budget, depth + 1)[0]
    budget.left -= _SCALAR_CHARS
    if which == "bool_value":
        return value.bool_value
    if which == "int_value":
        return value.int_value
    if which == "double_value":
        # JSON has no NaN or Infinity; keep what was sent, as text.
        return value.double_value if math.isfinite(value.double_value) else str(value.double_value)
    return None


def _attributes(
    attributes: Sequence[KeyValue], budget: _Budget, depth: int
) -> tuple[dict[str, JsonValue], int]:
    """The attributes that fit `budget`, and how many of them did not."""
    kept: dict[str, JsonValue] = {}
    taken = 0
    for kv in attributes[:MAX_ATTRIBUTES]:
        if budget.left <= 0:
            break
        key = budget.text(kv.key, MAX_KEY_CHARS)
        kept[key] = _any_value(kv.value, budget, depth)
        taken += 1
    return kept, len(attributes) - taken


def attributes_dict(attributes: Sequence[KeyValue]) -> dict[str, JsonValue]:
    """OTLP attributes as a JSON object within the bounds above (strings cut, the rest left
    out), with DROPPED_ATTR saying how many were left out."""
    kept, dropped = _attributes(attributes, _Budget(), 0)
    if dropped:
        kept[DROPPED_ATTR] = dropped
    return kept


def _text(value: JsonValue) -> str:
    return "" if value is None else str(value)


def nanos_to_datetime(nanos: int) -> datetime:
    return _EPOCH + timedelta(microseconds=nanos // 1000)


@dataclass(frozen=True)
class Attributed:
    """A span's or a log record's attributes with its resource's: Corral's attributes come from
    the item, else the resource."""

    attributes: Attributes
    resource: Attributes

    def text(self, key: str) -> str:
        value = self.attributes.get(key)
        if value is None or value == "":
            value = self.resource.get(key)
        return _text(value)


@dataclass(frozen=True)
class _Source(Attributed):
    """One span with its resource."""

    span: OtlpSpan


def _spans(request: ExportTraceServiceRequest) -> Iterator[_Source]:
    for resource_spans in request.resource_spans:
        resource = attributes_dict(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield _Source(attributes_dict(span.attributes), resource, span)


def _kind(span: OtlpSpan) -> str:
    if span.kind not in OtlpSpan.SpanKind.values():
        return "UNSPECIFIED"
    return OtlpSpan.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_")


@dataclass(frozen=True)
class Names:
    """The tenant and resource names a span is stored under."""

    tenant: str
    agent: str
    version: str
    endpoint: str


def names_of(text: Callable[[str], str], exporter: Exporter) -> Names:
    """The tenant and names a span or log record (its attribute `text`s) is filed under: as the
    platform says, or in the exporter's tenant with short names normalised."""
    agent, version, endpoint = text(AGENT_ATTR), text(VERSION_ATTR), text(ENDPOINT_ATTR)
    if exporter.trusted:
        return Names(text(TENANT_ATTR) or exporter.tenant, agent, version, endpoint)
    agent = normalised_agent(agent)
    return Names(
        exporter.tenant,
        agent,
        _child(agent, "versions", version),
        _child(agent, "endpoints", endpoint),
    )


def normalised_agent(agent: str) -> str:
    """An agent as a user's span may name it: `canary` or `agents/canary`."""
    if not agent or agent.startswith("agents/"):
        return agent
    return f"agents/{agent}"


def _child(agent: str, collection: str, value: str) -> str:
    """A version or endpoint in short form (`3`, `prod`) under `agent`, else as given."""
    if not value or value.startswith("agents/") or not agent or "/" in value:
        return value
    return f"{agent}/{collection}/{value}"


def _events(span: OtlpSpan) -> tuple[SpanEvent, ...]:
    """The span's first MAX_EVENTS events, their attributes within one MAX_ATTRIBUTE_CHARS for
    them all."""
    budget = _Budget()
    return tuple(
        SpanEvent(
            budget.text(e.name, MAX_KEY_CHARS),
            nanos_to_datetime(e.time_unix_nano),
            _attributes(e.attributes, budget, 0)[0],
        )
        for e in span.events[:MAX_EVENTS]
    )


def _row(source: _Source, exporter: Exporter) -> SpanRow:
    span = source.span
    names = names_of(source.text, exporter)
    end_nanos = max(span.end_time_unix_nano, span.start_time_unix_nano)
    return SpanRow(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        name=clean_text(span.name),
        service=_text(source.resource.get(SERVICE_NAME_ATTR)),
        kind=_kind(span),
        start_time=nanos_to_datetime(span.start_time_unix_nano),
        end_time=nanos_to_datetime(end_nanos),
        duration_ms=(end_nanos - span.start_time_unix_nano) / 1_000_000,
        status=_STATUS.get(span.status.code, SpanStatus.UNSET),
        status_message=clean_text(span.status.message),
        agent=names.agent,
        version=names.version,
        endpoint=names.endpoint,
        session=source.text(SESSION_ATTR),
        tenant=names.tenant,
        invocation_id=source.text(INVOCATION_ATTR),
        is_invocation=source.attributes.get(OPERATION_ATTR) == INVOKE_AGENT,
        platform=exporter.trusted,
        attributes=source.attributes,
        resource=source.resource,
        events=_events(span),
    )


def _scores(source: _Source, exporter: Exporter) -> Iterator[NewScore]:
    session = source.text(SESSION_ATTR)
    names = names_of(source.text, exporter)
    for event in source.span.events:
        if event.name != EVALUATION_EVENT:
            continue
        values = attributes_dict(event.attributes)
        name, value = values.get(SCORE_NAME_ATTR), values.get(SCORE_VALUE_ATTR)
        if (
            not isinstance(name, str)
            or not rules.valid_score_name(name)
            or not isinstance(value, int | float)
            or not 0.0 <= float(value) <= 1.0
            or not session
        ):
            log.warning(
                "ignoring an evaluation event without a valid name, value in [0, 1] or session"
            )
            continue
        yield NewScore(
            session=session,
            trace_id=source.span.trace_id.hex(),
            name=name,
            value=float(value),
            source=ScoreSource.CODE,
            comment=str(values.get(SCORE_EXPLANATION_ATTR, "")),
            agent=names.agent,
            version=names.version,
            endpoint=names.endpoint,
            tenant=names.tenant,
            user=exporter.user,
        )


def export_batch(request: ExportTraceServiceRequest, exporter: Exporter) -> ExportBatch:
    """Every span of an export as a row, and the scores its spans carry. Spans whose ids are not
    the sizes OTLP requires (16-byte trace id, 8-byte span id) are rejected and counted, as OTLP's
    partial success expects."""
    rows: list[SpanRow] = []
    scores: list[NewScore] = []
    rejected = 0
    for source in _spans(request):
        scores.extend(_scores(source, exporter))
        if len(source.span.trace_id) != 16 or len(source.span.span_id) != 8:
            rejected += 1
            continue
        rows.append(_row(source, exporter))
    reason = (
        f"{rejected} span(s) rejected: trace_id must be 16 bytes and span_id 8 bytes"
        if rejected
        else ""
    )
    return ExportBatch(rows=rows, scores=scores, rejected=rejected, reason=reason)


# An OTLP export of either signal telemetry takes in, and a list of OTLP attributes.
KeyValues: TypeAlias = "RepeatedCompositeFieldContainer[KeyValue]"
OtlpExport = TypeVar("OtlpExport", ExportTraceServiceRequest, ExportLogsServiceRequest)


def as_forwarded(request: OtlpExport, exporter: Exporter) -> OtlpExport:
    """`request` (spans or log records) as another backend should get it (CORRAL_OTLP_FORWARD):
    the platform's as sent; a user's saying the tenant its items were stored under, not one they
    claimed."""
    if exporter.trusted:
        return request
    forwarded = type(request)()
    forwarded.CopyFrom(request)
    for resource, items in _attribute_groups(forwarded):
        _without(resource, TENANT_ATTR)
        resource.add(key=TENANT_ATTR).value.string_value = exporter.tenant
        for attributes in items:
            _without(attributes, TENANT_ATTR)
    return forwarded


def _attribute_groups(
    request: ExportTraceServiceRequest | ExportLogsServiceRequest,
) -> Iterator[tuple[KeyValues, Iterator[KeyValues]]]:
    """Each resource's attributes, with those of its items (spans or log records)."""
    if isinstance(request, ExportTraceServiceRequest):
        for rs in request.resource_spans:
            yield rs.resource.attributes, (s.attributes for ss in rs.scope_spans for s in ss.spans)
    else:
        for rl in request.resource_logs:
            yield rl.resource.attributes, (
                r.attributes for sl in rl.scope_logs for r in sl.log_records)


def _without(attributes: KeyValues, key: str) -> None:
    kept = [kv for kv in attributes if kv.key != key]
    if len(kept) != len(attributes):
        del attributes[:]
        attributes.extend(kept)
