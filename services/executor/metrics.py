"""The executor's Prometheus metrics, served on its HTTP port (/metrics): what each invocation,
model call and tool call did, per agent version (the labels of services/common/prometheus.py),
and the sandboxes and warm pools. Counted where the work happens, in this process, so sums and
histogram quantiles aggregate across executor replicas."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.prometheus import LATENCY_BUCKETS_S, OK, SERIES_LABELS, Series

# Model id -> US dollars per million (input, output) tokens (Settings.model_prices).
Prices = Mapping[str, tuple[float, float]]


class ExecutorMetrics:
    def __init__(
        self, prices: Prices | None = None, registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.prices = dict(prices or {})
        series = list(SERIES_LABELS)
        self.invocations = Counter(
            "corral_invocations", "Invocations run, by outcome (code OK or the error's reason).",
            [*series, "code"], registry=self.registry)
        self.invocation_duration = Histogram(
            "corral_invocation_duration_seconds", "Invocation latency, sandbox start included.",
            series, registry=self.registry, buckets=LATENCY_BUCKETS_S)
        self.tool_calls = Counter(
            "corral_tool_calls", "Tool calls through the broker, by outcome (code OK or the failure).",
            [*series, "tool", "code"], registry=self.registry)
        self.model_calls = Counter(
            "corral_model_calls", "Model calls through the broker, by outcome (code OK or the error type).",
            [*series, "model", "code"], registry=self.registry)
        self.model_tokens = Counter(
            "corral_model_tokens", "Model tokens the provider reported, by direction (input, output).",
            [*series, "model", "direction"], registry=self.registry)
        self.model_cost = Counter(
            "corral_model_cost_usd", "Cost of the model tokens at CORRAL_MODEL_PRICES (unpriced models: 0).",
            [*series, "model"], registry=self.registry)
        self.pool_hits = Counter(
            "corral_warm_pool_hits", "New sessions that took a warm sandbox.",
            ["agent", "version"], registry=self.registry)
        self.pool_misses = Counter(
            "corral_warm_pool_misses", "New sessions that had to start a sandbox.",
            ["agent", "version"], registry=self.registry)
        self.pool_ready = Gauge(
            "corral_warm_pool_ready", "Warm sandboxes waiting, per version.",
            ["agent", "version"], registry=self.registry)
        self.pool_target = Gauge(
            "corral_warm_pool_target", "Warm sandboxes wanted, per version.",
            ["agent", "version"], registry=self.registry)
        self.telemetry_dropped = Counter(
            "corral_telemetry_dropped", "Spans and log records never delivered to telemetry: the "
            "buffer was full (buffer_full), telemetry refused them (refused), or they did not fit "
            "on disk at shutdown (shutdown).",
            ["signal", "reason"], registry=self.registry)
        self.telemetry_held = Gauge(
            "corral_telemetry_held_batches", "Export batches waiting for telemetry (memory and disk).",
            registry=self.registry)
        self.live = Gauge(
            "corral_sandboxes_live", "Sandboxes bound to a session.",
            registry=self.registry)
        self.sandbox_processes = Gauge(
            "corral_sandbox_processes",
            "Sandbox processes under the cap: bound to a session, warm, starting, stopping, and "
            "the start check's.", registry=self.registry)
        self.sandbox_cap = Gauge(
            "corral_sandbox_cap", "The cap on sandbox processes (CORRAL_EXECUTOR_MAX_SANDBOXES).",
            registry=self.registry)
        self.refusals = Counter(
            "corral_admission_refusals",
            "Invocations refused before they ran, by reason (code EXECUTOR_AT_CAPACITY, "
            "SESSION_QUEUE_FULL, SESSION_BUSY).", [*series, "code"], registry=self.registry)
        self.sandbox_start = Histogram(
            "corral_sandbox_start_duration_seconds", "Time to start a sandbox (bundle imported).",
            ["driver"], registry=self.registry,
            buckets=(0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8))

    def invocation(self, series: Series, code: str, seconds: float) -> None:
        self.invocations.labels(*series.labels, code).inc()
        self.invocation_duration.labels(*series.labels).observe(seconds)

    def tool_call(self, series: Series, tool: str, code: str) -> None:
        self.tool_calls.labels(*series.labels, tool, code or OK).inc()

    def model_call(
        self, series: Series, model: str, code: str, input_tokens: int = 0, output_tokens: int = 0
    ) -> None:
        self.model_calls.labels(*series.labels, model, code or OK).inc()
        if input_tokens:
            self.model_tokens.labels(*series.labels, model, "input").inc(input_tokens)
        if output_tokens:
            self.model_tokens.labels(*series.labels, model, "output").inc(output_tokens)
        price_in, price_out = self.prices.get(model, (0.0, 0.0))
        self.model_cost.labels(*series.labels, model).inc(
            (input_tokens * price_in + output_tokens * price_out) / 1_000_000)

    def count_telemetry_dropped(self, signal: str, reason: str, items: int) -> None:
        self.telemetry_dropped.labels(signal, reason).inc(items)
