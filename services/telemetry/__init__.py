"""Telemetry: OTLP spans in, queries over spans, traces and per-version metrics out."""
