"""OpenTelemetry set-up: spans exported over OTLP gRPC to the telemetry service (or, once a
service routes them elsewhere with `export_spans_through`, through its own exporter: the
executor's buffer, services/executor/delivery.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from services.common import addresses
from services.common.auth.pki import load_identity
from services.common.settings import Settings

_provider: TracerProvider | None = None


# Where this process's spans go instead of OTLP to telemetry (export_spans_through).
_target: SpanExporter | None = None


class _Relay(SpanExporter):
    """The batch processor's exporter: OTLP to telemetry unless a service routes spans through
    an exporter of its own."""

    def __init__(self, default: SpanExporter) -> None:
        self.default = default

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return (_target or self.default).export(spans)

    def shutdown(self) -> None:
        self.default.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return (_target or self.default).force_flush(timeout_millis)


def setup(service: str, settings: Settings) -> None:
    """Installs the global tracer provider. Telemetry does not export to itself."""
    global _provider
    if _provider is not None:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"corral-{service}"}))
    if settings.tracing and service != "telemetry":
        relay = _Relay(span_exporter(settings, service))
        provider.add_span_processor(BatchSpanProcessor(relay, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _provider = provider


def span_exporter(settings: Settings, service: str, timeout_s: float = 3) -> OTLPSpanExporter:
    """OTLP to telemetry's internal listener, proving `service`'s identity: the platform's spans,
    which telemetry trusts (a user's exports land in the user's tenant and never count as the
    platform's invocations)."""
    credentials = load_identity(settings.pki_dir, service).channel_credentials()
    target, balancing = addresses.grpc_target(settings.internal_addrs["telemetry"], "telemetry")
    return OTLPSpanExporter(
        endpoint=target, credentials=credentials, timeout=timeout_s,
        channel_options=tuple(balancing) or None,  # type: ignore[arg-type]  # typed too narrowly
    )


def export_spans_through(exporter: SpanExporter | None) -> None:
    """This process's spans go to `exporter` from now on (None: OTLP to telemetry again), whether
    the tracer provider is set up already or later."""
    global _target
    _target = exporter


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()


def server_interceptor() -> grpc.aio.ServerInterceptor:
    # opentelemetry-instrumentation-grpc has no type hints.
    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor()  # type: ignore[no-untyped-call]
    return interceptor


def client_interceptors() -> Sequence[grpc.aio.ClientInterceptor]:
    # Likewise untyped.
    interceptors: Sequence[grpc.aio.ClientInterceptor] = aio_client_interceptors()  # type: ignore[no-untyped-call]
    return interceptors


def inject_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC metadata (W3C traceparent/tracestate)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def extract_metadata(metadata: Sequence[tuple[str, Any]] | Mapping[str, Any] | None) -> Context:
    carrier = dict(metadata or ())
    return propagate.extract({k: v for k, v in carrier.items() if isinstance(v, str)})
