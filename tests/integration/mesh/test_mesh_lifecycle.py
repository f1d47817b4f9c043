"""Deleting, as the rest of the mesh sees it: a deleted live session's sandbox ends, and a
deleted agent's endpoints leave the router while its bundle leaves the executor's disk."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from corral.registry.v1 import registry_pb2 as reg
from corral.router.v1 import router_pb2 as rt
from corral.sessions.v1 import sessions_pb2 as ses
from tests.bundles import packed_agent, publish_requests
from tests.mesh import Mesh
from tests.rpc import fails

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def sandbox_sessions(mesh: Mesh) -> set[str]:
    return {s.session for s in await mesh.sandboxes()}


async def test_deleting_a_live_session_ends_its_sandbox(mesh: Mesh) -> None:
    agent = await mesh.publish_examples()
    session_id = f"{mesh.prefix}-gone"
    session = f"sessions/{session_id}"
    await mesh.invoke(agent, session_id=session_id)
    assert session in await sandbox_sessions(mesh)

    await mesh.sessions.DeleteSession(ses.DeleteSessionRequest(name=session), metadata=mesh.me)
    assert session not in await sandbox_sessions(mesh)
    await fails(grpc.StatusCode.NOT_FOUND, mesh.sessions.GetSession(
        ses.GetSessionRequest(name=session), metadata=mesh.me))
    # The router still had its pin: the next turn under the id hears the session is gone, and
    # the one after starts a new session there.
    err = await fails(grpc.StatusCode.NOT_FOUND, mesh.invoke(agent, session_id=session_id))
    assert session in (err.details() or "")
    again = await mesh.invoke(agent, session_id=session_id)
    assert again.output.startswith(b"Turn 1. ")


async def test_a_deleted_agent_leaves_the_router_and_its_bundle_the_executor(mesh: Mesh) -> None:
    agent = await mesh.publish_examples()
    session = f"sessions/{mesh.prefix}-last"
    answer = await mesh.invoke(agent, session_id=session.removeprefix("sessions/"))
    version = await mesh.registry.GetVersion(
        reg.GetVersionRequest(name=answer.info.version), metadata=mesh.me)
    unpacked = Path(mesh.hosts["executor"].settings.data_dir) / "bundles" / version.digest.replace(":", "-")
    assert unpacked.is_dir()

    await mesh.sessions.DeleteSession(ses.DeleteSessionRequest(name=session), metadata=mesh.me)
    await mesh.registry.DeleteAgent(
        reg.DeleteAgentRequest(name=f"agents/{agent}", force=True), metadata=mesh.me)
    async with asyncio.timeout(10):
        while unpacked.exists():
            await asyncio.sleep(0.05)
    await fails(grpc.StatusCode.NOT_FOUND, mesh.invoke(agent))


async def test_a_deleted_version_cannot_be_invoked_by_name_where_it_was_cached(mesh: Mesh) -> None:
    agent = f"{mesh.prefix}-three"
    for n in (1, 2, 3):  # DEFAULT serves 3 and keeps 2 for rollback: 1 is free once unused
        data = packed_agent(mesh.tmp, agent, prompt=f"Version {n}.\n")
        await mesh.registry.PublishVersion(iter(publish_requests(data)), metadata=mesh.me)
    first = await mesh.invoke(agent, version="1", session_id=f"{mesh.prefix}-old")
    assert first.info.version == f"agents/{agent}/versions/1"  # the router knows version 1 now
    await mesh.router.StopSession(
        rt.StopSessionRequest(name=f"sessions/{mesh.prefix}-old"), metadata=mesh.me)

    await mesh.registry.DeleteVersion(
        reg.DeleteVersionRequest(name=f"agents/{agent}/versions/1"), metadata=mesh.me)
    # The router hears of it on the endpoint watch, in order: once it sees a later change, it has
    # forgotten version 1 and asks the registry again, so no session is made for it.
    await mesh.set_split(agent, "probe", [(3, 100)])
    pinned = ses.ListSessionsRequest(version=f"agents/{agent}/versions/1")
    before = await mesh.sessions.ListSessions(pinned, metadata=mesh.me)
    err = await fails(grpc.StatusCode.NOT_FOUND, mesh.invoke(agent, version="1"))
    assert f"agents/{agent}/versions/1" in (err.details() or "")
    after = await mesh.sessions.ListSessions(pinned, metadata=mesh.me)
    assert [s.name for s in after.sessions] == [s.name for s in before.sessions]
