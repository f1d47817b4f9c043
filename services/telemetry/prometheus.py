"""Per-version RED metrics for Prometheus: invocations and errors (counters over all time),
sessions, tool calls and failures, model tokens, and latency quantiles over the last five
minutes, for every agent and version of every tenant."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from services.common.prometheus import Family, Snapshot
from services.telemetry.model import FleetMetrics, FleetVersion

LATENCY_WINDOW_S = 300.0
_LABELS = ("agent", "version", "tenant")


def snapshot(versions: list[FleetVersion]) -> Snapshot:
    """The metric families for `versions`."""

    def family(name: str, help: str, kind: str = "gauge", *extra: str) -> Family:
        return Family(name, help, (*_LABELS, *extra), kind)

    invocations = family("corral_version_invocations", "Invocations of the version", "counter")
    errors = family("corral_version_errors", "Failed invocations of the version", "counter")
    sessions = family("corral_version_sessions", "Distinct sessions that invoked the version")
    latency = family(
        "corral_version_latency_ms",
        f"Invocation latency quantiles over the last {LATENCY_WINDOW_S / 60:g} minutes",
        "gauge",
        "quantile",
    )
    tool_calls = family("corral_version_tool_calls", "Tool calls through the broker", "counter")
    tool_failures = family("corral_version_tool_failures", "Tool calls that failed", "counter")
    tokens = family("corral_version_tokens", "Model tokens", "counter", "direction")
    for v in versions:
        key, c = (v.agent, v.version, v.tenant), v.counts
        for fam, value in (
            (invocations, c.invocations),
            (errors, c.errors),
            (sessions, c.sessions),
            (tool_calls, c.tool_calls),
            (tool_failures, c.tool_failures),
        ):
            fam.samples.append((key, float(value)))
        tokens.samples.append(((*key, "input"), float(c.input_tokens)))
        tokens.samples.append(((*key, "output"), float(c.output_tokens)))
        if v.latency is not None:
            quantiles = (v.latency.p50_ms, v.latency.p95_ms, v.latency.p99_ms)
            for quantile, ms in zip(("0.5", "0.95", "0.99"), quantiles, strict=True):
                latency.samples.append(((*key, quantile), ms))
    return [invocations, errors, sessions, latency, tool_calls, tool_failures, tokens]


def version_snapshot(fleet: FleetMetrics) -> Callable[[], Awaitable[Snapshot]]:
    """What the metrics exporter calls to refresh its snapshot."""

    async def refresh() -> Snapshot:
        return snapshot(await fleet.fleet_versions(LATENCY_WINDOW_S))

    return refresh
