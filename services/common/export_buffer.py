"""What an exporter holds while telemetry cannot take it: OTLP export requests, oldest first, in
memory up to a bound, then spilled to files under a directory up to a second bound; beyond both,
new batches are dropped and the drops are counted and remembered as intervals to report.

Thread-safe: OpenTelemetry's batch processor puts from its own thread, the sender takes from the
event loop. Spilled files (and the drops not yet reported) survive a restart."""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

log = logging.getLogger(__name__)

_SUFFIX = ".otlp"
_DROPS_FILE = "drops.json"
# Drop intervals kept for the next report; beyond it the last one widens to take the new drop.
MAX_DROP_INTERVALS = 64


class Signal(StrEnum):
    TRACES = "traces"
    LOGS = "logs"


@dataclass(frozen=True)
class BufferLimits:
    """CORRAL_TELEMETRY_BUFFER_MEMORY_BYTES (16 MiB; one batch is always held, whatever its
    size) and CORRAL_TELEMETRY_BUFFER_DISK_BYTES (256 MiB; 0 keeps nothing on disk)."""

    memory_bytes: int = 16 * 1024 * 1024
    disk_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class Batch:
    """One export request, serialized; `first_ns`/`last_ns` bound its spans' start times (its
    records' times for logs) and `items` counts them. `seq` is its place in the buffer."""

    signal: Signal
    payload: bytes
    first_ns: int
    last_ns: int
    items: int
    seq: int = 0


@dataclass(frozen=True)
class _Spilled:
    """A batch on disk: its file's name says all but the payload."""

    signal: Signal
    first_ns: int
    last_ns: int
    items: int
    seq: int
    size: int

    @property
    def file_name(self) -> str:
        return f"{self.seq:016d}-{self.signal}-{self.first_ns}-{self.last_ns}-{self.items}{_SUFFIX}"


@dataclass(frozen=True)
class DropInterval:
    """`count` spans (or records) whose times lie in [first_ns, last_ns] that were never sent."""

    signal: Signal
    first_ns: int
    last_ns: int
    count: int

    def widened(self, other: DropInterval) -> DropInterval:
        return DropInterval(self.signal, min(self.first_ns, other.first_ns),
                            max(self.last_ns, other.last_ns), self.count + other.count)


OnDrop = Callable[[Signal, int, str], None]


def _ignore_drop(signal: Signal, count: int, reason: str) -> None:
    del signal, count, reason


class ExportBuffer:
    """Batches are taken in the order they were put. A batch goes to memory while memory has
    room (or is empty) and nothing is on disk (so every batch in memory is older than every batch on disk),
    else to disk; when neither has room it is dropped."""

    def __init__(
        self, limits: BufferLimits, spill_dir: Path | None, on_drop: OnDrop = _ignore_drop
    ) -> None:
        self._limits = limits
        self._dir = spill_dir
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self._memory: deque[Batch] = deque()
        self._memory_bytes = 0
        self._disk: deque[_Spilled] = deque()
        self._disk_bytes = 0
        self._drops: list[DropInterval] = []
        self._next_seq = 0
        if spill_dir is not None:
            spill_dir.mkdir(parents=True, exist_ok=True)
            self._load(spill_dir)

    # -- putting ---------------------------------------------------------------------------------

    def put(self, batch: Batch) -> bool:
        """False when the batch was dropped (counted, remembered for the next report)."""
        size = len(batch.payload)
        with self._lock:
            batch = replace(batch, seq=self._next_seq)
            self._next_seq += 1
            # Memory holds at least one batch, whatever its size: a bound below one export's
            # size still lets exports through while telemetry takes them.
            fits = not self._memory or self._memory_bytes + size <= self._limits.memory_bytes
            if not self._disk and fits:
                self._memory.append(batch)
                self._memory_bytes += size
                return True
            if self._fits_on_disk(size):
                self._disk.append(self._write(batch))
                return True
            self._drop(batch, "buffer_full")
            return False

    def _fits_on_disk(self, size: int) -> bool:
        return self._dir is not None and self._disk_bytes + size <= self._limits.disk_bytes

    def _drop(self, batch: Batch, reason: str) -> None:
        interval = DropInterval(batch.signal, batch.first_ns, batch.last_ns, batch.items)
        last = self._drops[-1] if self._drops else None
        if last is not None and last.signal is batch.signal and (
            len(self._drops) >= MAX_DROP_INTERVALS or _adjacent(last, interval)
        ):
            self._drops[-1] = last.widened(interval)
        else:
            self._drops.append(interval)
        self._save_drops()
        self._on_drop(batch.signal, batch.items, reason)

    # -- taking ----------------------------------------------------------------------------------

    def peek(self, max_bytes: int) -> list[Batch]:
        """The oldest batches of one signal, in order, up to `max_bytes` together (at least one)."""
        with self._lock:
            held: list[Batch | _Spilled] = [*self._memory, *self._disk]
        out: list[Batch] = []
        total = 0
        for h in held:
            size = h.size if isinstance(h, _Spilled) else len(h.payload)
            if out and (h.signal is not out[0].signal or total + size > max_bytes):
                break
            out.append(self._read(h) if isinstance(h, _Spilled) else h)
            total += size
        return out

    def remove(self, batches: Sequence[Batch]) -> None:
        """Forgets batches once delivered (what peek returned: still the oldest)."""
        seqs = {b.seq for b in batches}
        with self._lock:
            while self._memory and self._memory[0].seq in seqs:
                self._memory_bytes -= len(self._memory.popleft().payload)
            while self._disk and self._disk[0].seq in seqs:
                spilled = self._disk.popleft()
                self._disk_bytes -= spilled.size
                assert self._dir is not None
                (self._dir / spilled.file_name).unlink(missing_ok=True)

    def refused(self, batches: Sequence[Batch], reason: str) -> None:
        """Forgets batches telemetry refused for good: counted, not reported (telemetry knows)."""
        self.remove(batches)
        for batch in batches:
            self._on_drop(batch.signal, batch.items, reason)

    # -- state -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._memory) + len(self._disk)

    @property
    def held_bytes(self) -> tuple[int, int]:
        """(in memory, on disk)."""
        with self._lock:
            return self._memory_bytes, self._disk_bytes

    def oldest_span_ns(self) -> int | None:
        """The start time of the oldest span held, or None when no span is held."""
        with self._lock:
            held: list[Batch | _Spilled] = [*self._memory, *self._disk]
        firsts = [b.first_ns for b in held if b.signal is Signal.TRACES]
        return min(firsts, default=None)

    def has_drops(self) -> bool:
        """Drops not yet reported."""
        with self._lock:
            return bool(self._drops)

    def take_drops(self) -> list[DropInterval]:
        """The drops not yet reported, forgotten here until `untake_drops` gives them back (the
        report failed)."""
        with self._lock:
            taken, self._drops = self._drops, []
            self._save_drops()
        return taken

    def untake_drops(self, drops: Sequence[DropInterval]) -> None:
        with self._lock:
            self._drops[:0] = drops
            del self._drops[MAX_DROP_INTERVALS:]
            self._save_drops()

    def spill(self) -> int:
        """Writes what memory holds to disk (at shutdown), so that the next start sends it; what
        does not fit is dropped. Returns how many batches went to disk."""
        with self._lock:
            moved = list(self._memory)
            self._memory.clear()
            self._memory_bytes = 0
            written = []
            for batch in moved:
                if self._fits_on_disk(len(batch.payload)):
                    written.append(self._write(batch))
                else:
                    self._drop(batch, "shutdown")
            # Memory held the oldest: they go before what was on disk.
            self._disk.extendleft(reversed(written))
        return len(written)

    # -- disk ------------------------------------------------------------------------------------

    def _write(self, batch: Batch) -> _Spilled:
        assert self._dir is not None
        spilled = _Spilled(batch.signal, batch.first_ns, batch.last_ns, batch.items, batch.seq,
                           len(batch.payload))
        path = self._dir / spilled.file_name
        part = path.with_suffix(".part")
        part.write_bytes(batch.payload)
        part.replace(path)
        self._disk_bytes += spilled.size
        return spilled

    def _read(self, s: _Spilled) -> Batch:
        assert self._dir is not None
        payload = (self._dir / s.file_name).read_bytes()
        return Batch(s.signal, payload, s.first_ns, s.last_ns, s.items, s.seq)

    def _load(self, spill_dir: Path) -> None:
        for part in spill_dir.glob("*.part"):
            part.unlink()  # a write the previous process did not finish
        for path in sorted(spill_dir.glob(f"*{_SUFFIX}")):
            try:
                seq, signal, first, last, items = path.name.removesuffix(_SUFFIX).split("-")
                spilled = _Spilled(Signal(signal), int(first), int(last), int(items), int(seq),
                                   path.stat().st_size)
            except ValueError:
                log.warning("ignored %s: not a spilled telemetry batch", path)
                continue
            self._disk.append(spilled)
            self._disk_bytes += spilled.size
            self._next_seq = spilled.seq + 1
        drops = spill_dir / _DROPS_FILE
        if drops.exists():
            self._drops = [
                DropInterval(Signal(d["signal"]), d["first_ns"], d["last_ns"], d["count"])
                for d in json.loads(drops.read_text())
            ]
        if self._disk:
            log.info("%d telemetry batches (%d bytes) left on disk by the previous run, to send",
                     len(self._disk), self._disk_bytes)

    def _save_drops(self) -> None:
        if self._dir is None:
            return
        path = self._dir / _DROPS_FILE
        part = path.with_suffix(".part")
        part.write_text(json.dumps([
            {"signal": str(d.signal), "first_ns": d.first_ns, "last_ns": d.last_ns,
             "count": d.count} for d in self._drops
        ]))
        part.replace(path)


def _adjacent(a: DropInterval, b: DropInterval) -> bool:
    """Drops in a row while the buffer is full (within a second): one interval says it all."""
    return b.first_ns <= a.last_ns + 1_000_000_000
