"""OTLP/gRPC to the backend CORRAL_OTLP_FORWARD names (a Collector, Jaeger, Tempo, a vendor), its
form checked and its address allowed by the outbound policy when telemetry starts. Like the
executor's tool transport, a channel to a destination outside Corral, not to a Corral service."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from services.common.outbound import (
    OutboundPolicy,
    OutboundRefused,
    Target,
    Unresolved,
    parse_grpc,
    parse_url,
)
from services.common.settings import OtlpForward, SettingsError
from services.telemetry.forwarding import Export

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 10.0
_VARIABLE = "CORRAL_OTLP_FORWARD"


@dataclass(frozen=True)
class ForwardTarget:
    target: Target
    tls: bool


def parse_forward(endpoint: str) -> ForwardTarget:
    """host:port or http://host:port (plain gRPC), https://host:port (gRPC over TLS)."""
    hint = "give host:port, http://host:port or https://host:port of an OTLP/gRPC receiver"
    try:
        if "://" not in endpoint:
            return ForwardTarget(parse_grpc(endpoint), tls=False)
        target = parse_url(endpoint)
    except OutboundRefused as exc:
        raise SettingsError(f"{_VARIABLE}={endpoint!r}: {exc} ({hint})") from None
    if urlsplit(endpoint).port is None or urlsplit(endpoint).path not in ("", "/"):
        raise SettingsError(
            f"{_VARIABLE}={endpoint!r}: name the port and no path (4317 is OTLP/gRPC's); {hint}")
    return ForwardTarget(target, tls=target.scheme == "https")


async def checked_sink(forward: OtlpForward, outbound: OutboundPolicy) -> GrpcOtlpSink:
    """The sink for CORRAL_OTLP_FORWARD, refused (SettingsError) when the outbound policy forbids
    its address; a name that does not resolve yet is only logged (sends fail and are counted)."""
    parsed = parse_forward(forward.endpoint)
    try:
        await outbound.check(parsed.target)
    except Unresolved as exc:
        log.warning("%s=%r: %s; forwarding fails until it resolves", _VARIABLE, forward.endpoint, exc)
    except OutboundRefused as exc:
        raise SettingsError(
            f"{_VARIABLE}={forward.endpoint!r}: {exc} (for a backend on this machine or a private "
            "network, list its network in CORRAL_OUTBOUND_ALLOW, e.g. 10.0.0.0/8)") from None
    return GrpcOtlpSink(parsed, forward.headers)


class _TraceExport(Protocol):
    def Export(
        self, request: ExportTraceServiceRequest, *, metadata: Sequence[tuple[str, str]],
        timeout: float,
    ) -> Awaitable[ExportTraceServiceResponse]: ...


class _LogsExport(Protocol):
    def Export(
        self, request: ExportLogsServiceRequest, *, metadata: Sequence[tuple[str, str]],
        timeout: float,
    ) -> Awaitable[ExportLogsServiceResponse]: ...


# opentelemetry-proto ships its *_pb2_grpc modules without annotations: typed here, once.
_trace_stub: Callable[[grpc.aio.Channel], _TraceExport] = trace_service_pb2_grpc.TraceServiceStub
_logs_stub: Callable[[grpc.aio.Channel], _LogsExport] = logs_service_pb2_grpc.LogsServiceStub


class GrpcOtlpSink:
    def __init__(self, forward: ForwardTarget, headers: tuple[tuple[str, str], ...]) -> None:
        self.target = forward.target.authority
        self._channel = (
            grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials())
            if forward.tls else grpc.aio.insecure_channel(self.target)
        )
        self._traces = _trace_stub(self._channel)
        self._logs = _logs_stub(self._channel)
        self._headers = headers

    async def send(self, request: Export) -> None:
        if isinstance(request, ExportTraceServiceRequest):
            await self._traces.Export(request, metadata=self._headers, timeout=SEND_TIMEOUT_S)
        else:
            await self._logs.Export(request, metadata=self._headers, timeout=SEND_TIMEOUT_S)

    async def close(self) -> None:
        await self._channel.close()
