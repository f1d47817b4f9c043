"""Telemetry's PostgreSQL (schema `telemetry`), the only place in the service that speaks SQL:
spans, logs, scores and the fleet-wide figures behind Prometheus."""

from services.telemetry.store.fleet import PgFleetMetrics
from services.telemetry.store.logs import PgLogStore
from services.telemetry.store.scores import PgScoreStore
from services.telemetry.store.spans import PgSpanStore

__all__ = ["PgFleetMetrics", "PgLogStore", "PgScoreStore", "PgSpanStore"]
