"""Two executors in one platform, driven through the router: the fleet as administrators see it,
sessions spread over it and sent to the executor recorded with them, moved at their next turn when
that one is drained or gone (from their committed state), and a turn whose executor goes away
mid-turn told so."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from corral.executor.v1 import executor_pb2, executor_pb2_grpc
from corral.router.v1 import router_pb2 as rt
from corral.sessions.v1 import fleet_pb2, fleet_pb2_grpc
from corral.sessions.v1 import sessions_pb2 as ses
from services.common.server import ServiceHost
from tests.bundles import BEHAVIOUR
from tests.credentials import internal_channel, public_channel
from tests.fleet import platform_admin
from tests.harness import Platform
from tests.mesh import Mesh
from tests.rpc import body, error_details, fails

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SECOND = "exec-two"


@pytest_asyncio.fixture
async def fleet(
    mesh: Mesh, services: Platform
) -> AsyncIterator[fleet_pb2_grpc.FleetServiceAsyncStub]:
    """FleetService, for a platform administrator; the mesh with a second executor in it."""
    await services.start_executor(SECOND)
    async with internal_channel(mesh.settings, "sessions", "router") as channel:
        stub = fleet_pb2_grpc.FleetServiceStub(channel)
        await router_sees(mesh, 2)
        yield stub


def executor_names(mesh: Mesh) -> dict[str, ServiceHost]:
    """Each executor's host by its name in the fleet."""
    return {
        host.service.membership.name: host  # type: ignore[attr-defined]
        for key, host in mesh.hosts.items() if key.startswith("executor")
    }


async def router_sees(mesh: Mesh, members: int, draining: str | None = None) -> None:
    """Waits (bounded) until the router's fleet view has `members` members (and `draining`
    drained)."""
    view = mesh.hosts["router"].service.router.placement.fleet  # type: ignore[attr-defined]
    async with asyncio.timeout(10):
        while True:
            await view.refresh()
            live = view.members()
            drained = {m.name for m in live if m.draining}
            if len(live) == members and (draining is None or draining in drained):
                return
            await asyncio.sleep(0.1)


async def placed_on(mesh: Mesh, session: str) -> str:
    found = await mesh.sessions.GetSession(
        ses.GetSessionRequest(name=f"sessions/{session}"), metadata=mesh.me)
    return found.executor.removeprefix("executors/")


async def sandboxes_on(mesh: Mesh, host: ServiceHost) -> set[str]:
    async with public_channel(host.address) as channel:
        listing = await executor_pb2_grpc.ExecutorServiceStub(channel).ListSandboxes(
            executor_pb2.ListSandboxesRequest(), metadata=mesh.me)
    return {s.session for s in listing.sandboxes if s.session}


async def test_administrators_list_and_drain_the_fleet(
    mesh: Mesh, fleet: fleet_pb2_grpc.FleetServiceAsyncStub
) -> None:
    admin = platform_admin(mesh.settings)
    listed = await fleet.ListExecutors(fleet_pb2.ListExecutorsRequest(), metadata=admin)
    by_name = {e.name: e for e in listed.executors}
    assert set(executor_names(mesh)) | {SECOND} == {n.removeprefix("executors/") for n in by_name}
    second = by_name[f"executors/{SECOND}"]
    assert second.address == executor_names(mesh)[SECOND].internal_address
    assert second.capacity > 0 and not second.draining and second.driver
    # A tenant's administrator is not the platform's.
    async with public_channel(mesh.settings.addrs["sessions"]) as channel:
        err = await fails(
            grpc.StatusCode.PERMISSION_DENIED,
            fleet_pb2_grpc.FleetServiceStub(channel).ListExecutors(
                fleet_pb2.ListExecutorsRequest(), metadata=mesh.me),
        )
    assert "platform administrator" in (err.details() or "")

    drained = await fleet.DrainExecutor(
        fleet_pb2.DrainExecutorRequest(name=f"executors/{SECOND}"), metadata=admin)
    assert drained.draining and drained.name == f"executors/{SECOND}"
    listed = await fleet.ListExecutors(fleet_pb2.ListExecutorsRequest(), metadata=admin)
    assert [e.name for e in listed.executors if e.draining] == [f"executors/{SECOND}"]
    undrained = await fleet.UndrainExecutor(
        fleet_pb2.UndrainExecutorRequest(name=f"executors/{SECOND}"), metadata=admin)
    assert not undrained.draining
    err = await fails(grpc.StatusCode.NOT_FOUND, fleet.DrainExecutor(
        fleet_pb2.DrainExecutorRequest(name="executors/nobody"), metadata=admin))
    assert "not in the fleet" in (err.details() or "")


async def test_sessions_follow_their_executor_and_move_when_it_is_drained_or_gone(
    mesh: Mesh, fleet: fleet_pb2_grpc.FleetServiceAsyncStub
) -> None:
    agent = await mesh.publish_agent("spread", BEHAVIOUR)
    hosts = executor_names(mesh)
    sessions = [f"{mesh.prefix}-s{i}" for i in range(12)]
    for session in sessions:
        assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 1."
    where = {s: await placed_on(mesh, s) for s in sessions}
    assert set(where.values()) == set(hosts), "both executors take sessions"
    for name, host in hosts.items():
        mine = {f"sessions/{s}" for s, on in where.items() if on == name}
        assert await sandboxes_on(mesh, host) == mine
    # A second turn goes where the first ran.
    session = sessions[0]
    first = where[session]
    other = ({*hosts} - {first}).pop()
    assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 2."
    assert await placed_on(mesh, session) == first

    # Drained, its sessions move at their next turn, from their committed state.
    admin = platform_admin(mesh.settings)
    await fleet.DrainExecutor(fleet_pb2.DrainExecutorRequest(name=f"executors/{first}"), metadata=admin)
    await router_sees(mesh, 2, draining=first)
    assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 3."
    assert await placed_on(mesh, session) == other
    assert f"sessions/{session}" not in await sandboxes_on(mesh, hosts[first])
    # No new session goes to a drained executor.
    for n in range(6):
        await mesh.invoke(agent, {}, session_id=f"{mesh.prefix}-new{n}")
        assert await placed_on(mesh, f"{mesh.prefix}-new{n}") == other
    await fleet.UndrainExecutor(
        fleet_pb2.UndrainExecutorRequest(name=f"executors/{first}"), metadata=admin)

    # Its executor gone mid-turn: that turn is UNAVAILABLE naming it; the next runs elsewhere.
    slow = asyncio.ensure_future(mesh.router.Invoke(rt.InvokeRequest(
        agent=f"agents/{agent}", session_id=session,
        payload=body({"mode": "sleep", "seconds": 20})), metadata=mesh.me))
    await asyncio.sleep(1.0)  # the turn runs in the sandbox
    await hosts[other].stop(grace=0.1)
    err = await fails(grpc.StatusCode.UNAVAILABLE, slow)
    info = error_details(err)[0]
    assert info.reason == "EXECUTOR_UNAVAILABLE" and info.metadata["executor"] == f"executors/{other}"
    await router_sees(mesh, 1)
    assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 4."
    assert await placed_on(mesh, session) == first


async def test_a_turn_goes_on_when_its_executor_drops_out_of_the_routers_view(
    mesh: Mesh, fleet: fleet_pb2_grpc.FleetServiceAsyncStub
) -> None:
    """The fleet's view can lose a live executor for a moment (Redis restarted empty, so its
    heartbeat is not there yet): the router retires that executor's channel, and the turns it
    carries run to their end rather than being cut off with no answer (`make chaos` saw callers
    wait out their deadline)."""
    agent = await mesh.publish_agent("dropped", BEHAVIOUR)
    session = f"{mesh.prefix}-dropped"
    assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 1."
    slow = asyncio.ensure_future(mesh.router.Invoke(rt.InvokeRequest(
        agent=f"agents/{agent}", session_id=session,
        payload=body({"mode": "sleep", "seconds": 1.5})), metadata=mesh.me))
    await asyncio.sleep(0.5)  # the turn runs in the sandbox
    executors = mesh.hosts["router"].service.router._executor  # type: ignore[attr-defined]
    await executors.fleet_changed([])  # as the view reads when every heartbeat is gone
    async with asyncio.timeout(10):
        reply = await slow
    assert reply.output == b"Turn 2. Slept."
    assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 3."
