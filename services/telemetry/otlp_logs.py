"""OTLP logs → telemetry's domain: an ExportLogsServiceRequest as log rows, trusted as spans are
(otlp.py: the platform's records keep the tenant and names they carry, anyone else's land in the
exporter's tenant), and `ingest_logs`, the one call that stores an export, whichever transport
(OTLP/gRPC here, OTLP/HTTP /v1/logs) brought it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

from services.telemetry.log_model import LogBatch, LogRow
from services.telemetry.logs import AgentLogs
from services.telemetry.model import INVOCATION_ATTR, SESSION_ATTR, ExportResult
from services.telemetry.otlp import (
    Attributed,
    Exporter,
    attributes_dict,
    clean_text,
    names_of,
    nanos_to_datetime,
)

# What a record says is bounded per record (the invocation's bound is the domain's).
MAX_BODY_CHARS = 8 * 1024
# The attribute naming where a record came from: stdout, stderr, a Python logger.
SOURCE_ATTR = "corral.log.source"


@dataclass(frozen=True)
class _Source(Attributed):
    """One record with its resource."""

    record: LogRecord


def _records(request: ExportLogsServiceRequest) -> Iterator[_Source]:
    for resource_logs in request.resource_logs:
        resource = attributes_dict(resource_logs.resource.attributes)
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                yield _Source(attributes_dict(record.attributes), resource, record)


def _body(record: LogRecord) -> str:
    value = record.body
    if value.WhichOneof("value") == "string_value":
        return clean_text(value.string_value, MAX_BODY_CHARS)
    if value.WhichOneof("value") is None:
        return ""
    # Any other kind (a map, a list, a number): as JSON, within the same bounds as attributes.
    converted = attributes_dict([KeyValue(key="body", value=value)])
    return clean_text(json.dumps(converted.get("body")), MAX_BODY_CHARS)


def _row(source: _Source, exporter: Exporter) -> LogRow:
    record = source.record
    names = names_of(source.text, exporter)
    nanos = record.time_unix_nano or record.observed_time_unix_nano
    return LogRow(
        tenant=names.tenant,
        time=nanos_to_datetime(nanos),
        agent=names.agent,
        version=names.version,
        session=source.text(SESSION_ATTR),
        invocation_id=clean_text(source.text(INVOCATION_ATTR), 128),
        trace_id=record.trace_id.hex(),
        span_id=record.span_id.hex(),
        severity_number=record.severity_number,
        severity_text=clean_text(record.severity_text, 32),
        source=clean_text(source.text(SOURCE_ATTR), 256),
        body=_body(record),
        platform=exporter.trusted,
    )


def log_batch(request: ExportLogsServiceRequest, exporter: Exporter) -> LogBatch:
    """Every record of an export as a row. Records with a trace or span id of the wrong size
    (OTLP: 16 and 8 bytes, or none) are rejected and counted, as OTLP's partial success expects."""
    rows: list[LogRow] = []
    rejected = 0
    for source in _records(request):
        if len(source.record.trace_id) not in (0, 16) or len(source.record.span_id) not in (0, 8):
            rejected += 1
            continue
        rows.append(_row(source, exporter))
    reason = (
        f"{rejected} log record(s) rejected: trace_id must be 16 bytes and span_id 8 bytes"
        if rejected
        else ""
    )
    return LogBatch(rows, rejected, reason)


async def ingest_logs(
    request: ExportLogsServiceRequest, exporter: Exporter, logs: AgentLogs
) -> ExportResult:
    """Stores an OTLP logs export sent by `exporter`."""
    return await logs.export(log_batch(request, exporter))

