"""The `make_world` fixture: Worlds for a test, whose rollouts are all ended and channels closed
when it ends."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest_asyncio

from tests import harness
from tests.rollout_world import ACTIVE, World


@pytest_asyncio.fixture
async def make_world(services: harness.Platform, tmp_path: Path) -> AsyncIterator[Callable[..., World]]:
    worlds: list[World] = []

    def make(agent_prefix: str = "ro") -> World:
        w = World(services.settings, tmp_path, f"{agent_prefix}-{uuid.uuid4().hex[:8]}")
        worlds.append(w)
        return w

    yield make
    # The database is shared by the run, and every registry's controller drives every running
    # rollout: leave none of this test's running, whatever the outcome.
    conn = await asyncpg.connect(services.settings.require_database())
    try:
        for w in worlds:
            await conn.execute(
                "UPDATE registry.rollouts SET state = 'ABORTED', state_reason = 'test teardown', end_time = now() "
                "WHERE agent = $1 AND state = ANY($2::text[])", w.agent, list(ACTIVE))
    except asyncpg.UndefinedTableError:
        pass  # no registry ran in this database yet
    finally:
        await conn.close()
    for w in worlds:
        for ch in w.channels:
            await ch.close()
