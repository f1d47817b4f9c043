"""The executor's delivery to telemetry against a fake telemetry: offers never wait, what
telemetry cannot take is held and sent oldest first when it is back, the delivery state is
reported while behind (oldest span held, drops), refused batches do not hold up the rest, and a
restart sends what the previous run spilled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import tracing
from services.common.export_buffer import BufferLimits, DropInterval, ExportBuffer, Signal
from services.executor.delivery import (
    BufferedSpanExporter,
    DeliveryState,
    Refused,
    SpillDir,
    TelemetryDelivery,
    Unreachable,
    exporter_name,
)

S = 1_000_000_000


def spans(*starts_s: int) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(scope_spans=[
        trace_pb2.ScopeSpans(spans=[
            trace_pb2.Span(name=f"s{t}", start_time_unix_nano=t * S) for t in starts_s
        ])
    ])])


def records(*times_s: int) -> ExportLogsServiceRequest:
    return ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(scope_logs=[
        logs_pb2.ScopeLogs(log_records=[logs_pb2.LogRecord(time_unix_nano=t * S) for t in times_s])
    ])])


class FakeTelemetry:
    """Takes exports while `up`; `refuse` names spans it refuses for good."""

    def __init__(self) -> None:
        self.up = True
        self.refuse: set[str] = set()
        self.spans: list[str] = []
        self.records: list[int] = []
        self.reports: list[DeliveryState] = []
        self.turned_away = 0

    async def export(self, signal: Signal, payloads: Sequence[bytes]) -> None:
        if not self.up:
            self.turned_away += 1
            raise Unreachable("UNAVAILABLE: down")
        merged = b"".join(payloads)
        if signal is Signal.TRACES:
            names = [s.name for rs in ExportTraceServiceRequest.FromString(merged).resource_spans
                     for ss in rs.scope_spans for s in ss.spans]
            if self.refuse & set(names):
                raise Refused("INVALID_ARGUMENT: no")
            self.spans += names
        else:
            self.records += [r.time_unix_nano // S
                             for rl in ExportLogsServiceRequest.FromString(merged).resource_logs
                             for sl in rl.scope_logs for r in sl.log_records]

    async def report(self, state: DeliveryState) -> None:
        if not self.up:
            self.turned_away += 1
            raise Unreachable("UNAVAILABLE: down")
        self.reports.append(state)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.01)


def delivery(
    telemetry: FakeTelemetry, tmp_path: Path, limits: BufferLimits | None = None,
    drops: list[tuple[Signal, int, str]] | None = None,
) -> TelemetryDelivery:
    def count(signal: Signal, items: int, reason: str) -> None:
        (drops if drops is not None else []).append((signal, items, reason))

    buffer = ExportBuffer(limits or BufferLimits(), tmp_path, count)
    return TelemetryDelivery(buffer, telemetry, "executor-1", max_retry_wait_s=0.02)


async def test_while_telemetry_is_up_everything_is_sent_in_order_without_reports(
    tmp_path: Path,
) -> None:
    telemetry = FakeTelemetry()
    sender = delivery(telemetry, tmp_path)
    sender.start()
    try:
        sender.offer_spans(spans(1, 2))
        sender.offer_logs(records(3))
        sender.offer_spans(spans(4))
        await until(lambda: len(telemetry.spans) == 3 and telemetry.records == [3])
        assert telemetry.spans == ["s1", "s2", "s4"]
        assert telemetry.reports == []
    finally:
        await sender.close()


async def test_an_outage_is_reported_and_what_was_held_arrives_oldest_first(
    tmp_path: Path,
) -> None:
    telemetry = FakeTelemetry()
    telemetry.up = False
    sender = delivery(telemetry, tmp_path, BufferLimits(memory_bytes=40, disk_bytes=1 << 20))
    sender.start()
    try:
        for t in range(10, 20):
            sender.offer_spans(spans(t))  # returns at once: some in memory, the rest on disk
        sender.offer_logs(records(20))
        assert list(tmp_path.glob("*.otlp"))
        await until(lambda: telemetry.turned_away > 1)
        telemetry.up = True
        await until(lambda: len(telemetry.spans) == 10 and telemetry.records == [20])
        assert telemetry.spans == [f"s{t}" for t in range(10, 20)]
        await until(lambda: len(telemetry.reports) >= 2)
        # Before the backlog: it holds spans since the oldest; after it: none.
        assert telemetry.reports[0].undelivered_since_ns == 10 * S
        assert telemetry.reports[-1].undelivered_since_ns is None
        assert {r.exporter for r in telemetry.reports} == {"executor-1"}
        assert list(tmp_path.glob("*.otlp")) == []
    finally:
        await sender.close()


async def test_drops_are_counted_and_reported_as_intervals(tmp_path: Path) -> None:
    telemetry = FakeTelemetry()
    telemetry.up = False
    drops: list[tuple[Signal, int, str]] = []
    sender = delivery(telemetry, tmp_path, BufferLimits(memory_bytes=0, disk_bytes=0), drops)
    sender.start()
    try:
        sender.offer_spans(spans(1))  # held: memory takes one batch whatever its bound
        sender.offer_spans(spans(5, 6))
        sender.offer_logs(records(6))
        await until(lambda: telemetry.turned_away > 0)
        assert drops == [(Signal.TRACES, 2, "buffer_full"), (Signal.LOGS, 1, "buffer_full")]
        telemetry.up = True
        await until(lambda: bool(telemetry.reports))
        assert telemetry.reports[0].drops == (
            DropInterval(Signal.TRACES, 5 * S, 6 * S, 2), DropInterval(Signal.LOGS, 6 * S, 6 * S, 1)
        )
        assert telemetry.reports[0].undelivered_since_ns == 1 * S
        await until(lambda: telemetry.spans == ["s1"])
    finally:
        await sender.close()


async def test_a_refused_batch_is_dropped_and_the_others_still_arrive(tmp_path: Path) -> None:
    telemetry = FakeTelemetry()
    telemetry.refuse = {"s2"}
    telemetry.up = False
    drops: list[tuple[Signal, int, str]] = []
    sender = delivery(telemetry, tmp_path, drops=drops)
    sender.start()
    try:
        for t in (1, 2, 3):
            sender.offer_spans(spans(t))
        telemetry.up = True
        await until(lambda: len(telemetry.spans) == 2)
        assert telemetry.spans == ["s1", "s3"]
        assert drops == [(Signal.TRACES, 1, "refused")]
    finally:
        await sender.close()


async def test_a_restarted_delivery_sends_what_its_predecessor_spilled(tmp_path: Path) -> None:
    telemetry = FakeTelemetry()
    telemetry.up = False
    first = delivery(telemetry, tmp_path)
    first.start()
    first.offer_spans(spans(1))
    first.offer_spans(spans(2))
    await first.close()  # telemetry down: the two go to disk
    telemetry.up = True
    second = delivery(telemetry, tmp_path)
    second.start()
    try:
        await until(lambda: telemetry.spans == ["s1", "s2"])
        await until(lambda: bool(telemetry.reports)
                    and telemetry.reports[-1].undelivered_since_ns is None)
        assert telemetry.reports[0].undelivered_since_ns == 1 * S
    finally:
        await second.close()


def test_the_exporter_name_is_kept_with_the_spilled_data(tmp_path: Path) -> None:
    assert exporter_name("executor@h/a:1#1-abc", tmp_path) == "executor@h/a:1#1-abc"
    # The next process on the same directory answers for what is there.
    assert exporter_name("executor@h/a:1#2-def", tmp_path) == "executor@h/a:1#1-abc"


def test_a_second_executor_on_the_same_data_dir_spills_to_a_directory_of_its_own(
    tmp_path: Path,
) -> None:
    first = SpillDir(tmp_path / "telemetry-buffer", "executor@h/a:1#1-abc")
    second = SpillDir(tmp_path / "telemetry-buffer", "executor@h/a:1#2-def")
    try:
        assert first.path == tmp_path / "telemetry-buffer"
        assert second.path == tmp_path / "telemetry-buffer-executor_h_a_1_2-def"
    finally:
        first.release()
        second.release()
    # Released: the next executor takes the shared directory again.
    third = SpillDir(tmp_path / "telemetry-buffer", "executor@h/a:1#3-ghi")
    assert third.path == tmp_path / "telemetry-buffer"
    third.release()


async def test_the_executors_own_spans_go_through_the_buffer_whenever_tracing_was_set_up(
    tmp_path: Path,
) -> None:
    """OpenTelemetry's batch processor exports to tracing's relay; once the executor routes its
    spans through the delivery, they are encoded and held like the agents'."""
    telemetry = FakeTelemetry()
    sender = delivery(telemetry, tmp_path)
    provider = TracerProvider()
    direct = InMemorySpanExporter()
    relay = tracing._Relay(direct)  # what tracing.setup installs
    provider.add_span_processor(SimpleSpanProcessor(relay))
    sender.start()
    tracing.export_spans_through(BufferedSpanExporter(sender))
    try:
        with provider.get_tracer("t").start_as_current_span("invoke_agent a"):
            pass
        await until(lambda: telemetry.spans == ["invoke_agent a"])
        tracing.export_spans_through(None)
        with provider.get_tracer("t").start_as_current_span("after"):
            pass
        assert [s.name for s in direct.get_finished_spans()] == ["after"]
    finally:
        tracing.export_spans_through(None)
        await sender.close()
