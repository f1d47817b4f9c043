"""Forwarding to another OTLP backend (CORRAL_OTLP_FORWARD): every export telemetry accepts, traces
and logs, is also sent on, so a team keeps its Jaeger, Tempo, Loki or vendor. In the background, through a bounded
queue: when the backend lags or fails, exports are dropped (counted and logged), and the exporter
is never made to wait or to fail for it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from services.telemetry.metrics import TelemetryMetrics

log = logging.getLogger(__name__)

# Drops are logged at most this often, with how many since the last line.
LOG_EVERY_S = 10.0
# On close, what is queued gets this long to go out.
DRAIN_S = 2.0


# One export of either signal, as a receiver took it in.
Export = ExportTraceServiceRequest | ExportLogsServiceRequest


class OtlpSink(Protocol):
    """Where forwarded exports go (forward_sink.py: OTLP/gRPC)."""

    target: str

    async def send(self, request: Export) -> None:
        """Raises when the backend did not take it."""
        ...

    async def close(self) -> None: ...


def span_count(request: ExportTraceServiceRequest) -> int:
    return sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)


def record_count(request: ExportLogsServiceRequest) -> int:
    return sum(len(scope.log_records) for rl in request.resource_logs for scope in rl.scope_logs)


class Forwarder:
    def __init__(
        self, sink: OtlpSink, metrics: TelemetryMetrics, capacity: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._metrics = metrics
        self._queue: asyncio.Queue[Export] = asyncio.Queue(capacity)
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._unreported: dict[tuple[str, str], int] = {}
        self._reported_at = float("-inf")
        metrics.forward_queue.set_function(self._queue.qsize)

    def offer(self, request: Export) -> None:
        """Queues `request` to go out, or drops it when the queue is full. Never blocks."""
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            self._dropped(request, "queue_full", "the queue is full (the backend is slower than the exports)")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"forwarding exports to {self._sink.target}")

    async def close(self) -> None:
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_S):
                    await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._sink.close()

    async def _run(self) -> None:
        while True:
            request = await self._queue.get()
            try:
                await self._sink.send(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a backend's failure is counted, never raised
                self._dropped(request, "send_failed", f"{type(exc).__name__}: {str(exc)[:200]}")
            else:
                if isinstance(request, ExportTraceServiceRequest):
                    self._metrics.spans_forwarded.inc(span_count(request))
                else:
                    self._metrics.log_records_forwarded.inc(record_count(request))
            finally:
                self._queue.task_done()

    def _dropped(self, request: Export, reason: str, why: str) -> None:
        if isinstance(request, ExportTraceServiceRequest):
            what, count = "spans", span_count(request)
            self._metrics.spans_dropped.labels(reason).inc(count)
        else:
            what, count = "log records", record_count(request)
            self._metrics.log_records_dropped.labels(reason).inc(count)
        self._unreported[what, reason] = self._unreported.get((what, reason), 0) + count
        now = self._clock()
        if now - self._reported_at >= LOG_EVERY_S:
            counts = ", ".join(f"{n} {w} ({r})" for (w, r), n in sorted(self._unreported.items()))
            log.warning("not forwarded to %s: %s; last: %s", self._sink.target, counts, why)
            self._unreported.clear()
            self._reported_at = now
