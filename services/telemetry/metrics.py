"""Telemetry's own Prometheus metrics: what its OTLP receivers took in, per transport, and what
was forwarded to another backend or dropped on the way. The
per-version figures (invocations, latency, tools, tokens) are counted where the work happens, by
the executor (services/executor/metrics.py); telemetry's copies would repeat on every replica."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.telemetry.model import ExportResult


class TelemetryMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.spans_accepted = Counter(
            "corral_otlp_spans_accepted", "Spans an OTLP export delivered and telemetry kept.",
            ["transport"], registry=self.registry)
        self.spans_rejected = Counter(
            "corral_otlp_spans_rejected", "Spans refused (ids of the wrong size), by transport.",
            ["transport"], registry=self.registry)
        # CORRAL_OTLP_FORWARD (forwarding.py); zero when forwarding is off.
        self.spans_forwarded = Counter(
            "corral_otlp_forwarded_spans", "Spans sent on to the CORRAL_OTLP_FORWARD backend.",
            registry=self.registry)
        self.spans_dropped = Counter(
            "corral_otlp_forward_dropped_spans",
            "Spans not forwarded: queue_full (the backend lags) or send_failed.",
            ["reason"], registry=self.registry)
        self.log_records_forwarded = Counter(
            "corral_otlp_forwarded_log_records",
            "Log records sent on to the CORRAL_OTLP_FORWARD backend.", registry=self.registry)
        self.log_records_dropped = Counter(
            "corral_otlp_forward_dropped_log_records",
            "Log records not forwarded: queue_full (the backend lags) or send_failed.",
            ["reason"], registry=self.registry)
        self.forward_queue = Gauge(
            "corral_otlp_forward_queue", "Exports waiting to be forwarded.", registry=self.registry)

    def exported(self, transport: str, result: ExportResult) -> None:
        self.spans_accepted.labels(transport).inc(result.accepted)
        self.spans_rejected.labels(transport).inc(result.rejected)
