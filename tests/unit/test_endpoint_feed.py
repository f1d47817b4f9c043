"""The registry's endpoint watch across a lost LISTEN connection: open streams end UNAVAILABLE
(so routers stop claiming to be synced), new ones wait until notifications flow again, and a
change made after the loss reaches a new stream."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.common.errors import Unavailable
from services.registry.endpoint_feed import EndpointFeed
from tests.fakes.registry import RegistryWorld, registry_world
from tests.unit.test_registry_domain import AGENT, ALICE, bundle, published

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def world() -> RegistryWorld:
    return registry_world()


async def test_a_closed_connection_ends_open_streams_and_a_new_stream_sees_later_changes(
    world: RegistryWorld, tmp_path: Path
) -> None:
    await published(world, tmp_path, 1)
    await world.registry.start_watching()
    watch = world.registry.watch(ALICE, AGENT)
    await anext(watch)
    store = world.store
    store.listen_failures = 2  # PostgreSQL is still coming back for the first two attempts
    store.lose_listening_connection()
    with pytest.raises(Unavailable) as lost:
        await asyncio.wait_for(anext(watch), 1)
    assert lost.value.reason == "WATCH_INTERRUPTED"
    # A new stream is held until the registry listens again, then starts with a snapshot.
    again = world.registry.watch(ALICE, AGENT)
    snapshot = await asyncio.wait_for(anext(again), 5)
    assert snapshot.snapshot and [e.id for e in snapshot.endpoints] == ["DEFAULT"]
    assert store.listen_failures == 0 and len(store.connections) == 1
    await world.registry.publish(ALICE, None, bundle(tmp_path, prompt="second\n"), "", "")
    changed = await asyncio.wait_for(anext(again), 1)
    assert not changed.snapshot and changed.endpoints[0].traffic[0].version == 2
    await world.registry.stop_watching()


async def test_a_connection_that_stops_answering_is_found_by_the_probe(
    world: RegistryWorld, tmp_path: Path
) -> None:
    await published(world, tmp_path, 1)
    store = world.store
    feed = EndpointFeed(store, probe_s=0.05)
    await feed.start()
    async with feed.subscription() as changes:
        store.lose_listening_connection(silently=True)
        with pytest.raises(Unavailable):
            await asyncio.wait_for(changes.next(), 2)
    await asyncio.wait_for(feed.live.wait(), 2)
    async with feed.subscription() as changes:
        await world.registry.publish(ALICE, None, bundle(tmp_path, prompt="second\n"), "", "")
        change = await asyncio.wait_for(changes.next(), 1)
        assert change is not None and change[1] == AGENT.endpoint("DEFAULT")
    await feed.stop()


async def test_stopping_ends_streams_quietly(world: RegistryWorld) -> None:
    feed = EndpointFeed(world.store)
    await feed.start()
    async with feed.subscription() as changes:
        await feed.stop()
        assert await asyncio.wait_for(changes.next(), 1) is None


async def test_a_stream_held_for_a_listener_is_let_go_when_the_registry_stops(
    world: RegistryWorld,
) -> None:
    feed = EndpointFeed(world.store, probe_s=0.05)
    await feed.start()
    world.store.listen_failures = 1_000  # PostgreSQL does not come back
    world.store.lose_listening_connection()
    await asyncio.sleep(0.1)
    held = asyncio.create_task(feed.subscription().__aenter__())
    await asyncio.sleep(0.1)
    assert not held.done()
    await feed.stop()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(held, 1)
