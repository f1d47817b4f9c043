"""Telemetry's PostgreSQL (schema `telemetry`), the only place in the service that speaks SQL:
spans, logs, scores and exporters' delivery reports."""

from services.telemetry.store.delivery import PgDeliveryStore
from services.telemetry.store.logs import PgLogStore
from services.telemetry.store.scores import PgScoreStore
from services.telemetry.store.spans import PgSpanStore

__all__ = ["PgDeliveryStore", "PgLogStore", "PgScoreStore", "PgSpanStore"]
