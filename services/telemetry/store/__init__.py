"""Telemetry's PostgreSQL (schema `telemetry`), the only place in the service that speaks SQL:
spans, logs and scores."""

from services.telemetry.store.logs import PgLogStore
from services.telemetry.store.scores import PgScoreStore
from services.telemetry.store.spans import PgSpanStore

__all__ = ["PgLogStore", "PgScoreStore", "PgSpanStore"]
