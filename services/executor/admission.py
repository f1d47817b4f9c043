"""Admission on one executor: a hard cap on sandbox processes and a bounded queue per session.

Every sandbox process holds a `Slot` from before its worker is spawned until the worker has been
reaped: a session's, a warm pool's, one starting, one stopping, the start check's. So the number
of slots taken is never below the number of sandbox processes, and never above the cap. Starting
a sandbox (importing the agent) is the costly part, so at most `max_starting` start at once: more
would only share the CPU and make every start, and every live session's turn, slower; up to
`start_queue` more wait for their turn to start, each at most START_WAIT_S (a start takes well
under a second). A call that finds no slot (and nothing idle to evict, which is the sandbox
table's to decide), or finds the starts and their queue full, is refused at once with
RESOURCE_EXHAUSTED EXECUTOR_AT_CAPACITY and a retry delay."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass

from services.common.errors import Aborted, ResourceExhausted

REASON_AT_CAPACITY = "EXECUTOR_AT_CAPACITY"
REASON_QUEUE_FULL = "SESSION_QUEUE_FULL"
REASON_SESSION_BUSY = "SESSION_BUSY"
# What this executor refuses before a turn runs (counted as corral_admission_refusals_total).
REFUSALS = frozenset({REASON_AT_CAPACITY, REASON_QUEUE_FULL, REASON_SESSION_BUSY})
# What a refused caller is told to wait (google.rpc.RetryInfo): about one short turn.
AT_CAPACITY_RETRY_S = 1.0
QUEUE_FULL_RETRY_S = 0.5
# About one sandbox start.
STARTING_RETRY_S = 0.5
# How long a new session waits for its turn to start a sandbox.
START_WAIT_S = 5.0


class Slot:
    """One sandbox process's place under the cap. `release` may be called any number of times;
    only the first counts."""

    def __init__(self, slots: SandboxSlots) -> None:
        self._slots = slots
        self.starting = False
        self.stopping = False
        self.released = False

    def start_begins(self) -> None:
        if not self.starting and not self.released:
            self.starting = True
            self._slots.starting += 1

    def start_ends(self) -> None:
        if self.starting:
            self.starting = False
            self._slots.start_ended()

    def stop_begins(self) -> None:
        """The process is being stopped: its slot comes free once it has been reaped."""
        if not self.stopping and not self.released:
            self.stopping = True
            self._slots.stopping += 1

    def release(self) -> None:
        if self.released:
            return
        self.start_ends()
        self.released = True
        if self.stopping:
            self._slots.stopping -= 1
        self._slots.returned()


class SandboxSlots:
    """The executor's `cap` sandbox processes (ExecutorSettings.max_live_sandboxes), of which at
    most `max_starting` start at once, counted. `on_change(taken)` hears every change (the
    metrics gauge)."""

    def __init__(
        self, cap: int, on_change: Callable[[int], None] | None = None, max_starting: int = 4,
        start_queue: int = 16,
    ) -> None:
        self.cap, self.max_starting, self.start_queue = cap, max_starting, start_queue
        self.taken = 0
        # Of those taken, the ones whose sandbox is starting, and those waiting to start.
        self.starting = 0
        self.waiting_to_start = 0
        self._start_ended = asyncio.Event()
        # Of those taken, the ones whose process is being stopped (free soon).
        self.stopping = 0
        # The most taken at once since start: what the cap really bounded.
        self.peak = 0
        self._on_change = on_change
        self._returned = asyncio.Event()

    @property
    def free(self) -> int:
        return self.cap - self.taken

    def try_take(self) -> Slot | None:
        """A slot if one is free, else None (never waits)."""
        if self.taken >= self.cap:
            return None
        self.taken += 1
        self.peak = max(self.peak, self.taken)
        self._changed()
        return Slot(self)

    def returned(self) -> None:
        self.taken -= 1
        self._changed()
        self._returned.set()
        self._returned = asyncio.Event()

    async def wait_returned(self, timeout_s: float) -> bool:
        """Waits (at most `timeout_s`) for a slot to come back; whether one did."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._returned.wait()
                return True
        return False

    def can_start(self) -> bool:
        return self.starting < self.max_starting

    def can_queue_start(self) -> bool:
        return self.can_start() or self.waiting_to_start < self.start_queue

    def start_ended(self) -> None:
        self.starting -= 1
        self._start_ended.set()
        self._start_ended = asyncio.Event()

    async def start_turn(self, slot: Slot) -> None:
        """Marks `slot` starting once fewer than `max_starting` are: at once, or after waiting
        (at most START_WAIT_S, behind at most `start_queue` others); else EXECUTOR_AT_CAPACITY."""
        if not self.can_start():
            if self.waiting_to_start >= self.start_queue:
                raise self.too_many_starting()
            self.waiting_to_start += 1
            try:
                async with asyncio.timeout(START_WAIT_S):
                    while not self.can_start():
                        await self._start_ended.wait()
            except TimeoutError:
                raise self.too_many_starting() from None
            finally:
                self.waiting_to_start -= 1
        slot.start_begins()

    def too_many_starting(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"this executor is starting {self.starting} sandboxes, the most it starts at once "
            f"(CORRAL_EXECUTOR_MAX_STARTING={self.max_starting}), and {self.waiting_to_start} "
            f"more wait to start (CORRAL_EXECUTOR_START_QUEUE={self.start_queue}); retry after "
            "the delay given (or on another executor)",
            reason=REASON_AT_CAPACITY,
            metadata={"starting": str(self.starting), "max_starting": str(self.max_starting)},
            retry_delay_s=STARTING_RETRY_S,
        )

    def at_capacity(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"this executor runs {self.taken} sandboxes, its cap "
            f"(CORRAL_EXECUTOR_MAX_SANDBOXES={self.cap}), and none is idle enough to stop; retry "
            "after the delay given (or on another executor)",
            reason=REASON_AT_CAPACITY,
            metadata={"cap": str(self.cap), "sandboxes": str(self.taken)},
            retry_delay_s=AT_CAPACITY_RETRY_S,
        )

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.taken)


@dataclass
class _Line:
    """The turns of one session: the one running and those waiting behind it (FIFO)."""

    lock: asyncio.Lock
    waiting: int = 0


class SessionQueues:
    """One turn at a time per session, with at most `depth` more waiting for it, each at most
    `wait_s`. Beyond the depth a turn is refused at once (RESOURCE_EXHAUSTED SESSION_QUEUE_FULL,
    or with no queue at all, depth 0, ABORTED SESSION_BUSY); a turn that waited its time is
    refused ABORTED SESSION_BUSY."""

    def __init__(self, depth: int, wait_s: float) -> None:
        self.depth, self.wait_s = depth, wait_s
        self._lines: dict[Hashable, _Line] = {}

    def busy(self, key: Hashable) -> bool:
        line = self._lines.get(key)
        return line is not None and line.lock.locked()

    def waiting(self) -> int:
        return sum(line.waiting for line in self._lines.values())

    @contextlib.asynccontextmanager
    async def claim(self, key: Hashable, what: str) -> AsyncIterator[None]:
        """Holds the session `key` (named `what` in errors) for one turn."""
        line = self._lines.setdefault(key, _Line(asyncio.Lock()))
        try:
            if line.lock.locked() or line.waiting:
                await self._wait(line, what)
            else:
                await line.lock.acquire()  # free: returns at once
            try:
                yield
            finally:
                line.lock.release()
        finally:
            if not line.lock.locked() and not line.waiting and self._lines.get(key) is line:
                del self._lines[key]

    async def _wait(self, line: _Line, what: str) -> None:
        if self.depth <= 0:
            raise Aborted(
                f"session {what} is busy: another invocation is running on it; retry when it "
                "finishes", reason=REASON_SESSION_BUSY, metadata={"session": what},
            )
        if line.waiting >= self.depth:
            raise ResourceExhausted(
                f"session {what} has {line.waiting} invocations waiting behind the running one, "
                f"the most it queues (CORRAL_SESSION_QUEUE={self.depth}); retry after the delay "
                "given", reason=REASON_QUEUE_FULL, metadata={"session": what},
                retry_delay_s=QUEUE_FULL_RETRY_S,
            )
        line.waiting += 1
        began = time.monotonic()
        try:
            async with asyncio.timeout(self.wait_s):
                await line.lock.acquire()
        except TimeoutError:
            raise Aborted(
                f"session {what} is busy: waited {time.monotonic() - began:.1f}s "
                f"(CORRAL_SESSION_QUEUE_WAIT_S) for the invocation running on it; retry when it "
                "finishes", reason=REASON_SESSION_BUSY, metadata={"session": what},
            ) from None
        finally:
            line.waiting -= 1
