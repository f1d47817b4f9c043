"""Admission on one executor against fakes: the cap on sandboxes counts every one and refuses at
once when nothing is idle enough to stop, warm sandboxes give way to sessions, and a session's
turns queue a bounded number deep for a bounded time (services/executor/admission.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.names import SessionRef
from services.common.auth.principal import Role
from services.common.errors import Aborted, PermissionDenied, ResourceExhausted
from services.common.identity import Caller
from services.common.settings import ExecutorSettings
from services.executor.admission import SandboxSlots, SessionQueues
from services.executor.model import Completed, ModelHandler, ToolHandler, TurnInput, TurnOutput
from tests.fakes.executor import FakeWorker
from tests.unit.test_executor_domain import ALICE, World, until

pytestmark = pytest.mark.timeout(20)


def test_slots_stop_at_the_cap_and_come_back_once() -> None:
    seen: list[int] = []
    slots = SandboxSlots(2, seen.append)
    first, second = slots.try_take(), slots.try_take()
    assert first is not None and second is not None
    assert slots.try_take() is None
    first.release()
    first.release()  # a second release gives nothing back twice
    assert slots.taken == 1 and seen == [1, 2, 1]
    assert slots.try_take() is not None and slots.try_take() is None
    refusal = slots.at_capacity()
    assert refusal.reason == "EXECUTOR_AT_CAPACITY" and refusal.retry_delay_s
    assert refusal.metadata == {"cap": "2", "sandboxes": "2"}


class Gate:
    """An agent whose turns wait until let through."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.running = 0

    async def __call__(
        self, turn: TurnInput, model: ModelHandler, tools: ToolHandler, worker: FakeWorker
    ) -> AsyncIterator[bytes | TurnOutput]:
        self.running += 1
        await self.open.wait()
        self.running -= 1
        yield TurnOutput(turn.state + turn.payload)


def capped(tmp_path: Path, gate: Gate, **settings: float) -> World:
    return World(tmp_path, gate, settings=ExecutorSettings(
        warm_pool_size=0, max_live_sandboxes=2, **settings))  # type: ignore[arg-type]


async def test_at_the_cap_with_every_sandbox_busy_a_new_session_is_refused_at_once(
    tmp_path: Path,
) -> None:
    gate = Gate()
    world = capped(tmp_path, gate)
    world.executor.start()
    try:
        busy = [asyncio.ensure_future(world.run(s)) for s in ("s1", "s2")]
        await until(lambda: gate.running == 2)
        with pytest.raises(ResourceExhausted) as refused:
            await world.run("s3")
        assert refused.value.reason == "EXECUTOR_AT_CAPACITY" and refused.value.retry_delay_s
        assert len(world.starter.started) == 2  # nothing was started for s3
        assert world.starter.slots.peak == 2
        assert ("acme", SessionRef("s3")) not in world.sessions.leases  # no lease was asked for
        metrics = world.starter.metrics.registry
        labels = {"tenant": "acme", "agent": "echo", "version": "1", "endpoint": "prod"}
        assert metrics.get_sample_value(
            "corral_admission_refusals_total", {**labels, "code": "EXECUTOR_AT_CAPACITY"}) == 1
        assert metrics.get_sample_value("corral_sandbox_processes") == 2
        assert metrics.get_sample_value("corral_sandbox_cap") == 2
        gate.open.set()
        await asyncio.gather(*busy)
    finally:
        await world.executor.close()
    assert world.starter.slots.taken == 0


async def test_at_the_cap_an_idle_sandbox_makes_room_least_recently_used_first(
    tmp_path: Path,
) -> None:
    gate = Gate()
    gate.open.set()
    world = capped(tmp_path, gate, evict_idle_s=0.001)
    world.executor.start()
    try:
        await world.run("s1")
        await world.run("s2")
        await world.run("s1")  # s2 is now the least recently used
        await asyncio.sleep(0.01)
        await world.run("s3")
        sessions = {sb.session: sb.alive for sb in world.starter.started}
        assert sessions == {"sessions/s1": True, "sessions/s2": False, "sessions/s3": True}
        assert world.starter.slots.peak == 2
    finally:
        await world.executor.close()


async def test_a_sandbox_idle_for_less_than_the_eviction_age_is_not_stopped(tmp_path: Path) -> None:
    gate = Gate()
    gate.open.set()
    world = capped(tmp_path, gate, evict_idle_s=3600.0)
    world.executor.start()
    try:
        await world.run("s1")
        await world.run("s2")
        with pytest.raises(ResourceExhausted, match="CORRAL_EXECUTOR_MAX_SANDBOXES=2"):
            await world.run("s3")
        assert all(sb.alive for sb in world.starter.started)
    finally:
        await world.executor.close()


async def test_a_session_queue_runs_turns_in_order_and_refuses_beyond_its_depth() -> None:
    queues = SessionQueues(depth=2, wait_s=10.0)
    order: list[str] = []
    release = asyncio.Event()

    async def turn(name: str) -> None:
        async with queues.claim("s1", "sessions/s1"):
            order.append(name)
            if name == "first":
                await release.wait()

    first = asyncio.ensure_future(turn("first"))
    await until(lambda: order == ["first"])
    waiting = [asyncio.ensure_future(turn(n)) for n in ("second", "third")]
    await until(lambda: queues.waiting() == 2)
    with pytest.raises(ResourceExhausted) as full:
        await turn("fourth")
    assert full.value.reason == "SESSION_QUEUE_FULL" and full.value.retry_delay_s
    release.set()
    await asyncio.gather(first, *waiting)
    assert order == ["first", "second", "third"]
    assert not queues.busy("s1") and queues.waiting() == 0


async def test_a_turn_waits_for_its_session_only_so_long_and_not_at_all_without_a_queue() -> None:
    release = asyncio.Event()
    for queues, words in ((SessionQueues(4, 0.05), "waited"), (SessionQueues(0, 10.0), "is busy")):
        async with queues.claim("s1", "sessions/s1"):
            with pytest.raises(Aborted, match=words) as busy:
                async with queues.claim("s1", "sessions/s1"):
                    await release.wait()
            assert busy.value.reason == "SESSION_BUSY"
        async with queues.claim("s1", "sessions/s1"):  # free again
            pass


async def test_a_new_session_waits_its_turn_to_start_and_beyond_the_queue_is_refused(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, settings=ExecutorSettings(
        warm_pool_size=0, max_live_sandboxes=8, max_starting=1, start_queue=1))
    slots = world.starter.slots
    starting = slots.try_take()
    assert starting is not None
    starting.start_begins()  # a sandbox is starting (as the start check's would)
    waiting = asyncio.ensure_future(world.run("s1"))
    await until(lambda: slots.waiting_to_start == 1)
    with pytest.raises(ResourceExhausted, match="CORRAL_EXECUTOR_MAX_STARTING=1") as refused:
        await world.run("s2")
    assert refused.value.reason == "EXECUTOR_AT_CAPACITY" and refused.value.retry_delay_s
    starting.release()  # its start is over: s1 starts
    assert any(isinstance(e, Completed) for e in await waiting)
    assert slots.starting == 0 and slots.taken == 1
    await world.executor.close()
    assert slots.taken == 0


async def test_a_session_refused_its_lease_gives_its_slot_back(tmp_path: Path) -> None:
    world = World(tmp_path)
    await world.run("s1")
    await world.executor.stop_session(ALICE, SessionRef("s1"))
    assert world.starter.slots.taken == 0
    bob = Caller("acme", "bob", frozenset({Role.INVOKER}))
    with pytest.raises(PermissionDenied):
        await world.run("s1", caller=bob)  # alice's session: sessions refuses bob the lease
    assert world.starter.slots.taken == 0 and len(world.starter.started) == 1
    await world.executor.close()
