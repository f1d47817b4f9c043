"""Telemetry: OTLP spans in; spans, traces, per-version metrics, scores and version comparisons out."""
