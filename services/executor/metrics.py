"""The executor's Prometheus metrics, served on its HTTP port (/metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ExecutorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.pool_hits = Counter(
            "corral_executor_warm_pool_hits", "New sessions that took a warm sandbox.",
            ["version"], registry=self.registry)
        self.pool_misses = Counter(
            "corral_executor_warm_pool_misses", "New sessions that had to start a sandbox.",
            ["version"], registry=self.registry)
        self.pool_ready = Gauge(
            "corral_executor_warm_pool_ready", "Warm sandboxes waiting, per version.",
            ["version"], registry=self.registry)
        self.live = Gauge(
            "corral_executor_live_sandboxes", "Sandboxes bound to a session.",
            registry=self.registry)
        self.sandbox_start = Histogram(
            "corral_executor_sandbox_start_seconds", "Time to start a sandbox (bundle imported).",
            ["driver"], registry=self.registry,
            buckets=(0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4))
