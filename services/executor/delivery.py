"""The executor's spans (its own and the agents') and log records on their way to telemetry:
offered without ever waiting (a turn never blocks or fails because telemetry is down), held in an
ExportBuffer (memory, then disk under CORRAL_DATA_DIR), sent oldest first by one sender that
retries with back-off while telemetry cannot be reached. While it is behind, the sender reports
its delivery state (ReportDelivery: the oldest span it holds, the drops) so that rollout analysis
treats the window as missing data (services/telemetry/gaps.py)."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from services.common.background import TaskSet
from services.common.export_buffer import Batch, DropInterval, ExportBuffer, Signal

log = logging.getLogger(__name__)

# One export request carries at most this much (telemetry takes up to 16 MiB).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# The longest wait between two attempts while telemetry cannot be reached.
MAX_RETRY_WAIT_S = 1.0
# A line about drops at most this often (each says how many since the previous).
DROP_LOG_INTERVAL_S = 10.0
# While it works through a backlog, the sender tells telemetry how far it got this often.
REPORT_INTERVAL_S = 2.0


class Unreachable(Exception):
    """Telemetry did not take the call; the same call may succeed later."""


class Refused(Exception):
    """Telemetry refused what was sent (it does not parse, say): sending it again will not help."""


@dataclass(frozen=True)
class DeliveryState:
    exporter: str
    undelivered_since_ns: int | None
    drops: tuple[DropInterval, ...]


class DeliverySink(Protocol):
    """Telemetry as the sender sees it (services/executor/clients.py: TelemetryDeliverySink)."""

    async def export(self, signal: Signal, payloads: Sequence[bytes]) -> None: ...

    async def report(self, state: DeliveryState) -> None: ...


class SpillDir:
    """The directory an executor spills to, held with an exclusive lock for its lifetime: a second
    executor on the same CORRAL_DATA_DIR gets one of its own (named after its holder) rather than
    sending, and deleting, the first one's files."""

    def __init__(self, base: Path, holder: str) -> None:
        base.parent.mkdir(parents=True, exist_ok=True)
        self._lock = self._claim(base)
        self.path = base
        if self._lock is None:
            self.path = base.with_name(f"{base.name}-{re.sub(r'[^A-Za-z0-9._-]', '_', holder)}")
            log.warning("%s is another executor's; spilling to %s", base, self.path)
            self._lock = self._claim(self.path)

    @staticmethod
    def _claim(path: Path) -> int | None:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def exporter_name(holder: str, spill_dir: Path) -> str:
    """How this executor names itself to telemetry: the name kept in its spill directory, so that a
    restarted executor answers for what its predecessor spilled; the first start takes its lease
    holder's name. (The one place to change when executors get names of their own.)"""
    path = spill_dir / "exporter"
    if path.exists() and (kept := path.read_text().strip()):
        return kept
    spill_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(holder + "\n")
    return holder


class TelemetryDelivery:
    def __init__(
        self, buffer: ExportBuffer, sink: DeliverySink, exporter: str,
        max_retry_wait_s: float = MAX_RETRY_WAIT_S,
    ) -> None:
        self._buffer = buffer
        self._sink = sink
        self.exporter = exporter
        self._max_wait_s = max_retry_wait_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._tasks = TaskSet("telemetry delivery")
        # Telemetry was out of reach since the last report saying nothing is held: it must hear
        # what this executor holds before (and after) the backlog is sent.
        self._behind = len(buffer) > 0 or buffer.has_drops()
        self._unreachable_since: float | None = None

    # -- offering (any thread, never waits) ------------------------------------------------------

    def offer_spans(self, request: ExportTraceServiceRequest) -> None:
        starts = [s.start_time_unix_nano for rs in request.resource_spans
                  for ss in rs.scope_spans for s in ss.spans]
        if starts:
            self._offer(Batch(Signal.TRACES, request.SerializeToString(), min(starts), max(starts),
                              len(starts)))

    def offer_logs(self, request: ExportLogsServiceRequest) -> None:
        times = [r.time_unix_nano for rl in request.resource_logs
                 for sl in rl.scope_logs for r in sl.log_records]
        if times:
            self._offer(Batch(Signal.LOGS, request.SerializeToString(), min(times), max(times),
                              len(times)))

    def _offer(self, batch: Batch) -> None:
        self._buffer.put(batch)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wakeup.set)

    # -- sending ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup.set()  # what the previous run spilled goes first
        self._tasks.spawn(self._run())

    async def close(self, flush_s: float = 2.0) -> None:
        """Sends what is held for up to `flush_s`, then writes the rest to disk for the next
        start."""
        deadline = time.monotonic() + flush_s
        while len(self._buffer) and self._unreachable_since is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._loop = None
        await self._tasks.close()
        spilled = self._buffer.spill()
        if len(self._buffer):
            log.warning("telemetry delivery: %d batches left on disk for the next start (%d "
                        "written now)", len(self._buffer), spilled)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(Unreachable),
                wait=wait_exponential(multiplier=0.1, max=self._max_wait_s),
                before_sleep=self._unreachable,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._deliver()
            except Exception:
                log.exception("telemetry delivery failed; trying again")
                await asyncio.sleep(self._max_wait_s)
                self._wakeup.set()

    async def _deliver(self) -> None:
        """Everything held, oldest first; while behind, the state before and after."""
        if self._behind or self._buffer.has_drops():
            await self._report()
        reported = time.monotonic()
        while batches := self._buffer.peek(MAX_REQUEST_BYTES):
            await self._send(batches)
            if self._behind and time.monotonic() - reported >= REPORT_INTERVAL_S:
                await self._report()  # how far it got: analyses of older windows need not wait
                reported = time.monotonic()
        if self._behind:
            await self._report()
        if self._unreachable_since is not None:
            log.info("telemetry reachable again after %.1fs; everything held was delivered",
                     time.monotonic() - self._unreachable_since)
            self._unreachable_since = None

    async def _send(self, batches: list[Batch]) -> None:
        try:
            await self._sink.export(batches[0].signal, [b.payload for b in batches])
        except Unreachable:
            self._behind = True
            raise
        except Refused as exc:
            if len(batches) > 1:
                # One bad batch must not take the others with it: each on its own.
                for batch in batches:
                    await self._send([batch])
                return
            log.warning("telemetry refused %d %s: %s", batches[0].items, batches[0].signal, exc)
            self._buffer.refused(batches, "refused")
            return
        self._buffer.remove(batches)

    async def _report(self) -> None:
        drops = self._buffer.take_drops()
        state = DeliveryState(self.exporter, self._buffer.oldest_span_ns(), tuple(drops))
        try:
            await self._sink.report(state)
        except Unreachable:
            self._buffer.untake_drops(drops)
            self._behind = True
            raise
        except Refused as exc:
            log.warning("telemetry refused this executor's delivery report: %s", exc)
        # Spans offered since the state was read are told of at the next report.
        self._behind = state.undelivered_since_ns is not None

    def _unreachable(self, retry: RetryCallState) -> None:
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
            memory, disk = self._buffer.held_bytes
            log.warning(
                "telemetry unreachable (%s); holding %d batches (%d bytes in memory, %d on disk) "
                "and retrying", retry.outcome.exception() if retry.outcome else "", len(self._buffer),
                memory, disk,
            )


class DropLog:
    """Counts drops on the executor's /metrics and says so in the log, at most every 10 s."""

    def __init__(self, count: _DropCounter) -> None:
        self._count = count
        self._since_logged: dict[tuple[str, str], int] = {}
        self._logged_at = 0.0

    def __call__(self, signal: Signal, items: int, reason: str) -> None:
        self._count(str(signal), reason, items)
        key = (str(signal), reason)
        self._since_logged[key] = self._since_logged.get(key, 0) + items
        now = time.monotonic()
        if now - self._logged_at >= DROP_LOG_INTERVAL_S:
            self._logged_at = now
            said = ", ".join(f"{n} {s} ({r})" for (s, r), n in sorted(self._since_logged.items()))
            self._since_logged.clear()
            log.warning("dropped telemetry the buffer could not hold or telemetry refused: %s", said)


class _DropCounter(Protocol):
    def __call__(self, signal: str, reason: str, items: int) -> None: ...


class BufferedSpanExporter(SpanExporter):
    """The executor's own spans (OpenTelemetry's batch processor, on its thread) into the
    delivery's buffer: export never waits on telemetry."""

    def __init__(self, delivery: TelemetryDelivery) -> None:
        self._delivery = delivery

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._delivery.offer_spans(encode_spans(spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
