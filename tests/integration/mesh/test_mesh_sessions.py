"""All five services in-process, driven through the router: sessions owned by their tenant,
stopped, expired and given their version's lifecycle; the sandbox process behind a session;
and state surviving a restart of every service."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import grpc
import psutil
import pytest

from corral.executor.v1 import executor_pb2
from corral.registry.v1 import registry_pb2 as reg
from corral.router.v1 import router_pb2 as rt
from corral.sessions.v1 import sessions_pb2 as ses
from tests import harness
from tests.bundles import BEHAVIOUR, copy_example
from tests.conftest import StartServices
from tests.mesh import EXAMPLES, Mesh, version_of
from tests.rpc import error_details, fails, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


# -- sessions: tenants, stopping and lifetimes ------------------------------------------------


async def test_sessions_belong_to_their_tenant_and_end_when_stopped(mesh: Mesh) -> None:
    agent = await mesh.publish_examples()
    session = f"{mesh.prefix}-owned"
    await mesh.invoke(agent, session_id=session)
    # Session ids are per tenant: another tenant naming this one finds no such session of its
    # own. (Within the tenant, another user without the operator role is refused: the header
    # identities of this suite carry every role, so tests/unit/test_router_domain.py has that.)
    intruder = who(mesh.tenant + "-b")
    await fails(
        grpc.StatusCode.NOT_FOUND,
        mesh.router.StopSession(rt.StopSessionRequest(name=f"sessions/{session}"), metadata=intruder),
    )
    # Invoking under that id gives it a session (and a sandbox) of its own, never this one; or,
    # once agents belong to their tenant, not even the agent.
    for restarted in (False, True):
        if restarted:  # a router that has not seen the session (no cached pin)
            await mesh.hosts["router"].stop(grace=0.5)
            mesh.hosts["router"] = await harness.restart(mesh.hosts["router"])
        try:
            theirs = await mesh.invoke(agent, metadata=intruder, session_id=session)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
        else:
            assert theirs.output.startswith(b"Turn 1. " if not restarted else b"Turn 2. ")
    # The intruder changed nothing.
    assert (await mesh.invoke(agent, session_id=session)).output.startswith(b"Turn 2. ")
    sandboxes = await mesh.sandboxes()
    assert [s.session for s in sandboxes].count(f"sessions/{session}") == 1

    await mesh.router.StopSession(
        rt.StopSessionRequest(name=f"sessions/{session}"), metadata=mesh.me
    )
    err = await fails(grpc.StatusCode.FAILED_PRECONDITION, mesh.invoke(agent, session_id=session))
    assert "stopped" in (err.details() or "") and error_details(err)[0].reason
    stored = await mesh.sessions.GetSession(
        ses.GetSessionRequest(name=f"sessions/{session}"), metadata=mesh.me
    )
    assert stored.status == ses.SESSION_STATUS_STOPPED and stored.turn_count == 2
    sandboxes = await mesh.sandboxes()
    assert f"sessions/{session}" not in {s.session for s in sandboxes}
    await fails(
        grpc.StatusCode.NOT_FOUND,
        mesh.router.StopSession(
            rt.StopSessionRequest(name=f"sessions/{mesh.prefix}-never"), metadata=mesh.me
        ),
    )
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        mesh.router.StopSession(rt.StopSessionRequest(name=session), metadata=mesh.me),
    )


async def test_a_session_gets_its_versions_lifecycle(mesh: Mesh) -> None:
    lifecycle = "\n[lifecycle]\nidle_timeout_s = 60\nmax_lifetime_s = 120\n"
    agent = await mesh.publish_agent("brief", BEHAVIOUR, toml_extra=lifecycle)
    info = (await mesh.invoke(agent, {})).info
    stored = await mesh.sessions.GetSession(
        ses.GetSessionRequest(name=info.session), metadata=mesh.me
    )
    assert (stored.idle_timeout.seconds, stored.max_lifetime.seconds) == (60, 120)
    # Without a [lifecycle] table, the documented defaults.
    agent = await mesh.publish_agent("plain", BEHAVIOUR)
    info = (await mesh.invoke(agent, {})).info
    stored = await mesh.sessions.GetSession(
        ses.GetSessionRequest(name=info.session), metadata=mesh.me
    )
    assert (stored.idle_timeout.seconds, stored.max_lifetime.seconds) == (900, 28800)


async def test_stopping_a_session_mid_invocation_ends_it_with_a_clear_status(mesh: Mesh) -> None:
    agent = await mesh.publish_agent("stopme", BEHAVIOUR)
    session = f"{mesh.prefix}-stopme"
    await mesh.invoke(agent, {}, session_id=session)
    running = asyncio.ensure_future(mesh.invoke(agent, {"mode": "sleep", "seconds": 5}, session_id=session))
    listed: list[executor_pb2.Sandbox] = []
    for _ in range(100):  # wait until the second turn is running in the sandbox
        listed = [s for s in await mesh.sandboxes() if s.session == f"sessions/{session}"]
        if listed and listed[0].busy:
            break
        await asyncio.sleep(0.05)
    assert listed and listed[0].busy
    if mesh.settings.executor.sandbox_driver in ("", "bwrap") and shutil.which("bwrap"):
        assert listed[0].memory_bytes > 0, "the sandbox's cgroup reports its memory"
    await mesh.router.StopSession(rt.StopSessionRequest(name=f"sessions/{session}"), metadata=mesh.me)
    err = await fails(grpc.StatusCode.FAILED_PRECONDITION, running)
    assert error_details(err)[0].reason == "SESSION_STOPPED" and "stopped" in (err.details() or "")
    later = await fails(grpc.StatusCode.FAILED_PRECONDITION, mesh.invoke(agent, {}, session_id=session))
    assert "stopped" in (later.details() or "")


@pytest.mark.timeout(60)
async def test_a_session_does_not_outlive_its_max_lifetime(mesh: Mesh) -> None:
    agent = await mesh.publish_agent(
        "mortal", BEHAVIOUR, toml_extra="\n[lifecycle]\nidle_timeout_s = 2\nmax_lifetime_s = 3\n"
    )
    session = f"{mesh.prefix}-mortal"
    await mesh.invoke(agent, {}, session_id=session)
    listed = await mesh.sandboxes()
    pid = next(s.pid for s in listed if s.session == f"sessions/{session}")
    deadline = asyncio.get_running_loop().time() + 20
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert asyncio.get_running_loop().time() < deadline, "the sandbox outlived its lifetime"
        await asyncio.sleep(0.5)
    listed = await mesh.sandboxes()
    assert all(s.session != f"sessions/{session}" for s in listed)
    err = await fails(grpc.StatusCode.FAILED_PRECONDITION, mesh.invoke(agent, {}, session_id=session))
    assert "expired" in (err.details() or "")


# -- the sandbox process ----------------------------------------------------------------------


async def test_the_worker_is_its_own_process_without_the_executor_environment(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The executor runs in this process: what is in our environment is in the executor's.
    monkeypatch.setenv("CORRAL_DATABASE_URL", mesh.settings.database_url or "postgresql://secret")
    monkeypatch.setenv("CORRAL_TEST_SECRET", "do-not-leak")
    agent = await mesh.publish_agent("env", BEHAVIOUR)
    session = f"{mesh.prefix}-env"
    output = (await mesh.invoke(agent, {"mode": "env"}, session_id=session)).output
    seen = json.loads(output.removeprefix(b"Turn 1."))
    assert "CORRAL_DATABASE_URL" not in seen["env"] and "CORRAL_TEST_SECRET" not in seen["env"]
    assert not any(
        mesh.settings.database_url and mesh.settings.database_url in v for v in seen["env"].values()
    )
    assert seen["pid"] != os.getpid()
    assert Path(seen["cwd"]).resolve() != Path.cwd().resolve()

    sandboxes = await mesh.sandboxes()
    mine = [s for s in sandboxes if s.session == f"sessions/{session}"]
    assert len(mine) == 1 and not mine[0].busy
    assert mine[0].version == f"agents/{agent}/versions/1"
    host_pid = mine[0].pid
    assert host_pid != os.getpid() and psutil.pid_exists(host_pid)
    # The same worker serves the session's next turn, and is gone once the session stops.
    again = json.loads(
        (await mesh.invoke(agent, {"mode": "env"}, session_id=session)).output.removeprefix(
            b"Turn 2."
        )
    )
    assert again["pid"] == seen["pid"] and again["cwd"] == seen["cwd"]
    await mesh.router.StopSession(
        rt.StopSessionRequest(name=f"sessions/{session}"), metadata=mesh.me
    )
    assert not psutil.pid_exists(host_pid) or psutil.Process(host_pid).status() == psutil.STATUS_ZOMBIE
    if mesh.settings.executor.sandbox_driver == "process":
        # The process driver's private disk is a directory under the data dir, wiped with it
        # (the bwrap driver's is a tmpfs that ends with the sandbox).
        assert not Path(seen["cwd"]).exists()


async def test_state_survives_restarting_every_service(
    mesh: Mesh, start_services: StartServices
) -> None:
    agent = await mesh.publish_examples()
    default = await mesh.registry.GetEndpoint(
        reg.GetEndpointRequest(name=f"agents/{agent}/endpoints/DEFAULT"), metadata=mesh.me
    )
    await mesh.router_sees(agent, "DEFAULT", default.revision)
    session = f"{mesh.prefix}-restart"
    first = await mesh.invoke(agent, endpoint="DEFAULT", session_id=session)
    assert first.output.startswith(b"Turn 1. ") and version_of(first) == 2
    pid = (await mesh.sandboxes())[0].pid

    await harness.stop_mesh(mesh.hosts)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # no worker outlives its executor
    mesh.hosts.update(await start_services(*harness.MESH))

    second = await mesh.invoke(agent, endpoint="DEFAULT", session_id=session)
    assert second.output.startswith(b"Turn 2. ") and second.info.version == first.info.version
    assert not second.info.new_session
    # The registry's data survived too: a third version still becomes DEFAULT's.
    root = copy_example(EXAMPLES / "progress-report", mesh.tmp / "v3", agent)
    (root / "prompt.md").write_text("Be brief.\n")
    assert (await mesh.publish(root)).number == 3
