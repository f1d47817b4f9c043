"""Warm pools, through the real mesh with the default sandbox driver: the versions an endpoint
routes to and its rollback version are kept started; a new session takes a warm sandbox (a hit)
instead of starting one; pools refill; a version nobody routes to any more is let go."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from corral.executor.v1 import executor_pb2 as ex
from corral.registry.v1 import rollouts_pb2 as ro
from corral.registry.v1 import rollouts_pb2_grpc
from services.common.settings import Settings
from tests import harness
from tests.bundles import agent_files, write_bundle
from tests.credentials import public_channel
from tests.mesh import Mesh, started_mesh, version_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

AGENT = """
import os
from corral.sdk import App

app = App()
STARTED_PID = os.getpid()


@app.entrypoint
def run(payload, ctx):
    yield f"v{VERSION} pid {STARTED_PID}"
"""


@pytest.fixture
def warm_settings(postgres_server_url: str, redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    # A database of its own: the executor warms what every endpoint in its database routes to.
    with harness.scratch_database(postgres_server_url, "corral_warm") as url:
        yield harness.make_settings(url, redis_url, tmp_path, CORRAL_WARM_POOL_SIZE="1")


@pytest_asyncio.fixture
async def mesh(warm_settings: Settings, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with started_mesh(warm_settings, tmp_path) as m:
        yield m


async def publish(mesh: Mesh, agent: str, n: int) -> None:
    files = agent_files(agent, AGENT.replace("{VERSION}", str(n)))
    version = await mesh.publish(write_bundle(mesh.tmp / f"{agent}-{n}", files))
    assert version.number == n


async def listing(mesh: Mesh) -> ex.ListSandboxesResponse:
    return await mesh.executor.ListSandboxes(ex.ListSandboxesRequest())


async def pools_become(mesh: Mesh, expected: dict[str, tuple[int, list[str]]]) -> ex.ListSandboxesResponse:
    """Waits until each version's pool has `ready` sandboxes for `reasons` (versions not named
    have none ready)."""
    seen = None
    try:
        async with asyncio.timeout(30):
            while True:
                seen = await listing(mesh)
                pools = {p.version: (p.ready, list(p.reasons)) for p in seen.pools if p.ready or p.reasons}
                if pools == expected:
                    return seen
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"pools never became {expected}; last seen {seen}") from None


async def test_routed_and_rollback_versions_are_warm_and_sessions_take_them(mesh: Mesh) -> None:
    agent = f"{mesh.prefix}-warm"
    v = lambda n: f"agents/{agent}/versions/{n}"
    await publish(mesh, agent, 1)
    await mesh.set_split(agent, "prod", [(1, 100)])
    # DEFAULT and prod both route to v1: one pool, kept at its size.
    seen = await pools_become(mesh, {v(1): (1, ["routed"])})
    warm = [s for s in seen.sandboxes if s.state == ex.Sandbox.STATE_WARM]
    assert len(warm) == 1 and warm[0].session == "" and warm[0].version == v(1)
    assert warm[0].driver in ("bwrap", "gvisor", "process") and warm[0].age.ToMilliseconds() >= 0
    warm_pid = warm[0].pid

    # A new session takes the warm sandbox: the same process answers, and it counts as a hit.
    first = await mesh.invoke(agent, endpoint="prod")
    assert version_of(first) == 1
    seen = await listing(mesh)
    mine = [s for s in seen.sandboxes if s.session == first.info.session]
    assert len(mine) == 1 and mine[0].pid == warm_pid and mine[0].state == ex.Sandbox.STATE_IDLE
    pool = {p.version: p for p in seen.pools}[v(1)]
    assert (pool.hits, pool.misses) == (1, 0)
    # ...and the pool refills with a new sandbox, never the session's.
    seen = await pools_become(mesh, {v(1): (1, ["routed", "active"])})
    refill = [s for s in seen.sandboxes if s.state == ex.Sandbox.STATE_WARM]
    assert refill[0].pid != warm_pid
    # The session's next turn stays on its own sandbox.
    again = await mesh.invoke(agent, session_id=first.info.session.removeprefix("sessions/"))
    assert again.output == first.output

    # v2 takes prod (and DEFAULT follows the newest): v2 is routed, v1 is prod's rollback.
    await publish(mesh, agent, 2)
    await mesh.set_split(agent, "prod", [(2, 100)])
    await pools_become(mesh, {v(1): (1, ["rollback", "active"]), v(2): (1, ["routed"])})
    second = await mesh.invoke(agent, endpoint="prod")
    assert version_of(second) == 2

    # A rollback finds v1 warm: the first new session after it starts no sandbox.
    async with public_channel(mesh.settings.addrs["registry"]) as channel:
        back = await rollouts_pb2_grpc.RolloutServiceStub(channel).RollbackEndpoint(
            ro.RollbackEndpointRequest(name=f"agents/{agent}/endpoints/prod"), metadata=mesh.me)
    await mesh.router_sees(agent, "prod", back.revision)
    before = {p.version: p for p in (await listing(mesh)).pools}[v(1)]
    after_rollback = await mesh.invoke(agent, endpoint="prod")
    assert version_of(after_rollback) == 1
    pool = {p.version: p for p in (await listing(mesh)).pools}[v(1)]
    assert (pool.hits, pool.misses) == (before.hits + 1, before.misses)


async def test_a_session_finds_no_warm_sandbox_is_a_miss_and_its_version_warms(mesh: Mesh) -> None:
    agent = f"{mesh.prefix}-cold"
    for n in (1, 2, 3):  # DEFAULT routes to v3, and would roll back to v2; v1 is nobody's
        await publish(mesh, agent, n)
    v = lambda n: f"agents/{agent}/versions/{n}"
    await pools_become(mesh, {v(3): (1, ["routed"]), v(2): (1, ["rollback"])})
    cold = await mesh.invoke(agent, version=v(1))
    assert version_of(cold) == 1
    seen = await pools_become(mesh, {
        v(3): (1, ["routed"]), v(2): (1, ["rollback"]), v(1): (1, ["active"]),
    })
    pool = {p.version: p for p in seen.pools}[v(1)]
    assert (pool.hits, pool.misses) == (0, 1)
    hot = await mesh.invoke(agent, version=v(1))
    pool = {p.version: p for p in (await listing(mesh)).pools}[v(1)]
    assert (pool.hits, pool.misses) == (1, 1)
    assert hot.info.session != cold.info.session
