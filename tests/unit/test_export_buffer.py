"""The executor's telemetry buffer: memory first, then disk, then drops (counted and remembered
as intervals); batches taken oldest first across memory and disk; what is spilled survives a
restart."""

from __future__ import annotations

from pathlib import Path

from services.common.export_buffer import (
    MAX_DROP_INTERVALS,
    Batch,
    BufferLimits,
    DropInterval,
    ExportBuffer,
    Signal,
)

S = 1_000_000_000


def batch(n: int, size: int = 100, signal: Signal = Signal.TRACES, items: int = 1) -> Batch:
    """Batch number `n`: its spans started at second n, its payload says n."""
    payload = f"{n}:".encode().ljust(size, b".")
    return Batch(signal, payload, n * S, n * S, items)


class Drops:
    def __init__(self) -> None:
        self.counted: list[tuple[Signal, int, str]] = []

    def __call__(self, signal: Signal, items: int, reason: str) -> None:
        self.counted.append((signal, items, reason))


def drain(buffer: ExportBuffer, max_bytes: int = 1 << 20) -> list[bytes]:
    out = []
    while taken := buffer.peek(max_bytes):
        out += [b.payload for b in taken]
        buffer.remove(taken)
    return out


def test_memory_holds_up_to_its_bound_then_batches_go_to_disk(tmp_path: Path) -> None:
    buffer = ExportBuffer(BufferLimits(memory_bytes=300, disk_bytes=10_000), tmp_path)
    for n in range(5):
        assert buffer.put(batch(n))
    assert buffer.held_bytes == (300, 200)
    assert len(list(tmp_path.glob("*.otlp"))) == 2


def test_batches_come_out_oldest_first_across_memory_and_disk(tmp_path: Path) -> None:
    buffer = ExportBuffer(BufferLimits(memory_bytes=300, disk_bytes=10_000), tmp_path)
    for n in range(4):
        buffer.put(batch(n))
    # Memory has room again once one is delivered; the next still goes after those on disk.
    taken = buffer.peek(100)
    assert [b.payload[:2] for b in taken] == [b"0:"]
    buffer.remove(taken)
    buffer.put(batch(4))
    assert [p[:2] for p in drain(buffer)] == [b"1:", b"2:", b"3:", b"4:"]
    assert list(tmp_path.glob("*.otlp")) == []
    assert buffer.held_bytes == (0, 0)


def test_peek_takes_one_signal_at_a_time_within_the_size(tmp_path: Path) -> None:
    buffer = ExportBuffer(BufferLimits(), tmp_path)
    for n, signal in enumerate([Signal.TRACES, Signal.TRACES, Signal.TRACES, Signal.LOGS]):
        buffer.put(batch(n, signal=signal))
    assert [b.payload[:2] for b in buffer.peek(250)] == [b"0:", b"1:"]
    assert [b.payload[:2] for b in buffer.peek(10_000)] == [b"0:", b"1:", b"2:"]
    # A batch larger than the size still goes, alone.
    assert len(buffer.peek(10)) == 1


def test_beyond_both_bounds_batches_are_dropped_counted_and_remembered(tmp_path: Path) -> None:
    drops = Drops()
    buffer = ExportBuffer(BufferLimits(memory_bytes=100, disk_bytes=100), tmp_path, drops)
    assert buffer.put(batch(1))
    assert buffer.put(batch(2))
    assert not buffer.put(batch(3, items=5))
    assert not buffer.put(batch(4, items=2))
    assert not buffer.put(batch(10, signal=Signal.LOGS, items=7))
    assert drops.counted == [(Signal.TRACES, 5, "buffer_full"), (Signal.TRACES, 2, "buffer_full"),
                             (Signal.LOGS, 7, "buffer_full")]
    # Drops a second apart make one interval.
    assert buffer.take_drops() == [DropInterval(Signal.TRACES, 3 * S, 4 * S, 7),
                                   DropInterval(Signal.LOGS, 10 * S, 10 * S, 7)]
    assert not buffer.has_drops()
    # Kept batches are untouched: the oldest two.
    assert [p[:2] for p in drain(buffer)] == [b"1:", b"2:"]


def test_drops_given_back_after_a_failed_report_are_reported_next(tmp_path: Path) -> None:
    buffer = ExportBuffer(BufferLimits(memory_bytes=0, disk_bytes=0), tmp_path)
    assert buffer.put(batch(0))  # memory holds one batch, whatever its bound
    buffer.put(batch(1))
    taken = buffer.take_drops()
    buffer.put(batch(30))
    buffer.untake_drops(taken)
    assert [d.first_ns for d in buffer.take_drops()] == [1 * S, 30 * S]


def test_drop_intervals_are_bounded(tmp_path: Path) -> None:
    buffer = ExportBuffer(BufferLimits(memory_bytes=0, disk_bytes=0), None)
    buffer.put(batch(-1))  # held
    for n in range(0, 10 * MAX_DROP_INTERVALS, 5):  # 5 s apart: an interval each, at first
        buffer.put(batch(n))
    drops = buffer.take_drops()
    assert len(drops) == MAX_DROP_INTERVALS
    assert sum(d.count for d in drops) == 2 * MAX_DROP_INTERVALS
    assert drops[-1].last_ns == (10 * MAX_DROP_INTERVALS - 5) * S


def test_without_a_directory_nothing_goes_to_disk(tmp_path: Path) -> None:
    drops = Drops()
    buffer = ExportBuffer(BufferLimits(memory_bytes=100, disk_bytes=10_000), None, drops)
    assert buffer.put(batch(1))
    assert not buffer.put(batch(2))
    assert drops.counted == [(Signal.TRACES, 1, "buffer_full")]


def test_the_oldest_span_held_is_the_earliest_start_of_any_span_batch(tmp_path: Path) -> None:
    buffer = ExportBuffer(BufferLimits(memory_bytes=150, disk_bytes=10_000), tmp_path)
    assert buffer.oldest_span_ns() is None
    buffer.put(batch(1, signal=Signal.LOGS))
    assert buffer.oldest_span_ns() is None
    buffer.put(batch(7))
    buffer.put(Batch(Signal.TRACES, b"x" * 100, 3 * S, 9 * S, 2))  # on disk, started earlier
    assert buffer.oldest_span_ns() == 3 * S


def test_a_restarted_buffer_sends_what_was_spilled_first(tmp_path: Path) -> None:
    limits = BufferLimits(memory_bytes=250, disk_bytes=10_000)
    first = ExportBuffer(limits, tmp_path)
    for n in range(4):
        first.put(batch(n))
    first.put(batch(4, signal=Signal.LOGS))
    assert first.spill() == 2  # memory's two, before the three already on disk
    # A crash leaves a half-written file: ignored.
    (tmp_path / "0000000000000099-traces-1-1-1.part").write_bytes(b"half")
    second = ExportBuffer(limits, tmp_path)
    assert len(second) == 5
    assert second.oldest_span_ns() == 0
    second.put(batch(5))
    assert [p[:2] for p in drain(second)] == [b"0:", b"1:", b"2:", b"3:", b"4:", b"5:"]
    assert list(tmp_path.glob("*.part")) == []


def test_unreported_drops_survive_a_restart(tmp_path: Path) -> None:
    limits = BufferLimits(memory_bytes=0, disk_bytes=0)
    first = ExportBuffer(limits, tmp_path)
    first.put(batch(1))  # held (and lost with the process: it was in memory)
    first.put(batch(2, items=3))
    assert ExportBuffer(limits, tmp_path).take_drops() == [
        DropInterval(Signal.TRACES, 2 * S, 2 * S, 3)
    ]
    assert ExportBuffer(limits, tmp_path).take_drops() == []


def test_spill_drops_what_does_not_fit_on_disk(tmp_path: Path) -> None:
    drops = Drops()
    buffer = ExportBuffer(BufferLimits(memory_bytes=1000, disk_bytes=150), tmp_path, drops)
    buffer.put(batch(1))
    buffer.put(batch(2))
    assert buffer.spill() == 1
    assert drops.counted == [(Signal.TRACES, 1, "shutdown")]
    assert [p[:2] for p in drain(buffer)] == [b"1:"]
