"""Telemetry's PostgreSQL (schema `telemetry`), the only place in the service that speaks SQL:
spans and scores."""

from services.telemetry.store.scores import PgScoreStore
from services.telemetry.store.spans import PgSpanStore

__all__ = ["PgScoreStore", "PgSpanStore"]
