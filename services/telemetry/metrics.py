"""Telemetry's own Prometheus metrics: what its OTLP receivers took in, per transport. The
per-version figures (invocations, latency, tools, tokens) are counted where the work happens, by
the executor (services/executor/metrics.py); telemetry's copies would repeat on every replica."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

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

    def exported(self, transport: str, result: ExportResult) -> None:
        self.spans_accepted.labels(transport).inc(result.accepted)
        self.spans_rejected.labels(transport).inc(result.rejected)
