"""OTLP over HTTP (the OTLP/HTTP transport of the OTLP specification): POST /v1/traces with an
ExportTraceServiceRequest and POST /v1/logs with an ExportLogsServiceRequest, in binary protobuf or
JSON, optionally gzip-compressed, into the very receivers gRPC exports reach, the caller checked as
the gRPC Export checks it (a user's export lands in its own tenant and never counts as the
platform's). Each signal is one `Signal` in the list OtlpHttp serves."""

from __future__ import annotations

import base64
import json
import logging
import re
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from services.common.auth.interceptor import AUTHORIZATION, Authenticator
from services.common.auth.principal import Principal
from services.common.errors import CorralError, InvalidArgument, ResourceExhausted, Unauthenticated
from services.common.http_server import HttpSite
from services.common.status import google_status, status_code
from services.common.store_errors import store_error
from services.telemetry.logs_servicer import LogReceiver
from services.telemetry.receiver import SpanReceiver

log = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
# Bodies beyond this (after decompression) are refused with 413.
MAX_BODY_BYTES = 16 * 1024 * 1024
EXPORT_TRACES = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
EXPORT_LOGS = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
# OTLP/JSON writes trace and span ids as hex, where proto3's JSON mapping has base64.
_HEX_IDS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
# What an OTLP/HTTP exporter should do: retry 429 and 5xx but 500 and 501; fix the rest.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

RequestT = TypeVar("RequestT", bound=Message)


@dataclass(frozen=True)
class Signal(Generic[RequestT]):
    """One kind of OTLP export over HTTP: its path, the gRPC method whose access rule it shares,
    its request message, and what takes an export in (request, exporter, transport → answer)."""

    path: str
    method: str
    request: type[RequestT]
    export: Callable[[RequestT, Principal, str], Awaitable[Message]]


def traces(receiver: SpanReceiver) -> Signal[ExportTraceServiceRequest]:
    return Signal("/v1/traces", EXPORT_TRACES, ExportTraceServiceRequest, receiver.export)


def logs(receiver: LogReceiver) -> Signal[ExportLogsServiceRequest]:
    return Signal("/v1/logs", EXPORT_LOGS, ExportLogsServiceRequest, receiver.export)


class Refused(Exception):
    """A request refused with an HTTP status of its own (413, 415) and the error it reports."""

    def __init__(self, http_status: int, error: CorralError) -> None:
        super().__init__(error.message)
        self.http_status = http_status
        self.error = error


def decode(request: type[RequestT], body: bytes, content_type: str) -> RequestT:
    """The export a body carries, in `content_type` (PROTOBUF or JSON)."""
    message = request()
    if content_type == PROTOBUF:
        try:
            message.ParseFromString(body)
        except DecodeError:
            raise InvalidArgument("the body is not a binary protobuf " + request.DESCRIPTOR.name,
                                  reason="MALFORMED_REQUEST") from None
        return message
    try:
        document = json.loads(body)
        if not isinstance(document, dict):
            raise InvalidArgument(f"the body must be a JSON object ({request.DESCRIPTOR.name})",
                                  reason="MALFORMED_REQUEST")
        # A bad hex id raises InvalidArgument naming its field, which passes through.
        json_format.ParseDict(_hex_ids_as_base64(document, ""), message, ignore_unknown_fields=True)
    except (ValueError, RecursionError, json_format.ParseError) as exc:
        raise InvalidArgument(
            f"the body is not OTLP/JSON ({request.DESCRIPTOR.name}): {str(exc)[:200]}",
            reason="MALFORMED_REQUEST") from None
    return message


def _hex_ids_as_base64(value: Any, path: str) -> Any:
    """`value` with every trace and span id turned from OTLP/JSON's hex into proto3's base64."""
    if isinstance(value, list):
        return [_hex_ids_as_base64(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        if key in _HEX_IDS and isinstance(item, str):
            if not _HEX.fullmatch(item):
                raise InvalidArgument.field(where, f"{item[:40]!r} is not a hex id")
            item = base64.b64encode(bytes.fromhex(item)).decode("ascii")
        out[key] = _hex_ids_as_base64(item, where)
    return out


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent before its Content-Encoding (none or gzip), at most `limit` bytes."""
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise Refused(415, InvalidArgument(
            f"Content-Encoding {encoding[:40]!r} is not supported: send gzip or none"))
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise InvalidArgument("the body is not valid gzip", reason="MALFORMED_REQUEST") from None
    if len(out) > limit:
        raise Refused(413, _too_large(limit))
    if not inflater.eof:
        raise InvalidArgument("the gzip body ends early", reason="MALFORMED_REQUEST")
    return out


def _too_large(limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"the export is larger than {limit} bytes: send smaller batches", reason="BODY_TOO_LARGE")


class OtlpHttp(HttpSite):
    """Serves `signals` on host:port; every request is authenticated by `authenticator` as a
    call of the signal's gRPC method would be (a Bearer credential: an API key or a token)."""

    def __init__(
        self, signals: Sequence[Signal[Any]], authenticator: Authenticator, host: str, port: int,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._authenticator = authenticator
        self._limit = max_body_bytes
        # aiohttp refuses a longer body itself (HTTPRequestEntityTooLarge), before reading it all.
        app = web.Application(client_max_size=max_body_bytes)
        for signal in signals:
            app.router.add_post(signal.path, self._handler(signal))
        super().__init__(app, host, port, "OTLP/HTTP receiver", auto_decompress=False)

    def _handler(self, signal: Signal[Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            # Answers come back in the format the export came in; JSON when that is unknown.
            content_type = request.content_type if request.content_type in (PROTOBUF, JSON) else JSON
            try:
                answer = await self._export(signal, request)
            except Refused as refused:
                return _response(refused.http_status, google_status(refused.error, "telemetry"), content_type)
            except Exception as exc:
                # A domain error, or a store that is down or busy (503, 429: as gRPC answers).
                failure = exc if isinstance(exc, CorralError) else store_error(exc)
                if failure is None:
                    raise
                status = _HTTP_STATUS.get(status_code(failure), 500)
                return _response(status, google_status(failure, "telemetry"), content_type)
            return _response(200, answer, content_type)

        return handle

    async def _export(self, signal: Signal[Any], request: web.Request) -> Message:
        # Who is calling comes first: an anonymous caller learns nothing of the rest.
        credentials = request.headers.getall(AUTHORIZATION, [])
        if len(credentials) > 1:
            raise Unauthenticated("send one Authorization header, not several")
        verified = await self._authenticator.admit(
            {AUTHORIZATION: credentials[0] if credentials else ""}, None, signal.method)
        if request.content_type not in (PROTOBUF, JSON):
            raise Refused(415, InvalidArgument(
                f"Content-Type {request.content_type[:60]!r} is not OTLP/HTTP: send {PROTOBUF} "
                f"or {JSON}"))
        if request.content_length is not None and request.content_length > self._limit:
            raise Refused(413, _too_large(self._limit))
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Refused(413, _too_large(self._limit)) from None
        body = inflate(body, request.headers.get("Content-Encoding", "").strip().lower(), self._limit)
        message = decode(signal.request, body, request.content_type)
        return await signal.export(message, verified.principal, "http")


def _response(http_status: int, message: Message, content_type: str) -> web.Response:
    if content_type == PROTOBUF:
        return web.Response(status=http_status, body=message.SerializeToString(), content_type=PROTOBUF)
    return web.Response(status=http_status, text=json_format.MessageToJson(message), content_type=JSON)
