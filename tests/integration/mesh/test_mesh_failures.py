"""All five services in-process, driven through the router: failures and the statuses they
come back with (a busy session, an agent that raises, crashes, times out or does not import,
bad requests and unknown targets), each leaving the session usable. (Publishing refuses a version
that does not import, tests/integration/test_start_check.py; a version published with the start
check off, or before there was one, still reaches invocations.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from corral.router.v1 import router_pb2 as rt
from corral.sessions.v1 import sessions_pb2 as ses
from services.common.settings import Settings, StartCheck
from tests.bundles import BEHAVIOUR
from tests.mesh import Mesh, started_mesh
from tests.rpc import body, error_details, fails, retry_delay_s

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest_asyncio.fixture
async def unchecked(settings: Settings, tmp_path: Path) -> AsyncIterator[Mesh]:
    """The mesh with the start check at publish off: a version that cannot start is published."""
    async with started_mesh(replace(settings, start_check=StartCheck.OFF), tmp_path) as mesh:
        yield mesh


# -- failures ---------------------------------------------------------------------------------


async def test_calls_on_a_busy_session_queue_behind_it_and_beyond_the_queue_are_refused(
    mesh: Mesh,
) -> None:
    agent = await mesh.publish_agent("sleepy", BEHAVIOUR)
    session = f"{mesh.prefix}-busy"
    assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 1."
    first = asyncio.create_task(
        mesh.invoke(agent, {"mode": "sleep", "seconds": 2}, session_id=session))
    await asyncio.sleep(0.3)  # the first call is running in the sandbox
    # CORRAL_SESSION_QUEUE (4) wait their turn; the fifth is told at once to come back later.
    results = await asyncio.gather(
        *(mesh.invoke(agent, {}, session_id=session) for _ in range(5)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(refused) == 1 and refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED, results
    info, _ = error_details(refused[0])
    assert (info.reason, info.domain) == ("SESSION_QUEUE_FULL", "executor")
    assert retry_delay_s(refused[0])
    assert (await first).output == b"Turn 2. Slept."
    answered = sorted(r.output for r in results if isinstance(r, rt.InvokeResponse))
    assert answered == [f"Turn {n}.".encode() for n in range(3, 7)]
    # The refusal did not disturb the session.
    assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 7."


async def test_an_agent_exception_is_reported_and_leaves_the_committed_state(mesh: Mesh) -> None:
    agent = await mesh.publish_agent("boom", BEHAVIOUR)
    session = f"{mesh.prefix}-boom"
    assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 1."
    state_before = await mesh.sessions.GetSessionState(
        ses.GetSessionStateRequest(name=f"sessions/{session}"), metadata=mesh.me
    )

    err = await fails(
        grpc.StatusCode.INTERNAL, mesh.invoke(agent, {"mode": "boom"}, session_id=session)
    )
    assert "ValueError" in (err.details() or "") and "boom" in (err.details() or "")
    info, _ = error_details(err)
    assert info.reason == "AGENT_ERROR" and info.metadata["error_type"] == "ValueError"
    # Streamed, the chunk sent before the exception arrives, then the same error.
    call = mesh.router.InvokeStream(
        rt.InvokeRequest(
            agent=f"agents/{agent}", session_id=session, payload=body({"mode": "boom"})
        ),
        metadata=mesh.me,
    )
    seen: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for event in call:
            seen.append(event.WhichOneof("event"))
    assert streamed.value.code() == grpc.StatusCode.INTERNAL and "boom" in (
        streamed.value.details() or ""
    )
    assert seen == ["started", "chunk"]

    state_after = await mesh.sessions.GetSessionState(
        ses.GetSessionStateRequest(name=f"sessions/{session}"), metadata=mesh.me
    )
    assert (state_after.state, state_after.etag, state_after.turn_count) == (
        state_before.state,
        state_before.etag,
        1,
    )
    assert json.loads(state_after.state) == {"turns": 1}
    # The next turn starts from the committed state, not the failed turn's.
    assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 2."


async def test_a_cancelled_crashed_or_timed_out_turn_leaves_the_session_usable(mesh: Mesh) -> None:
    agent = await mesh.publish_agent(
        "fragile", BEHAVIOUR, toml_extra="\n[resources]\ntimeout_s = 1\n"
    )
    session = f"{mesh.prefix}-fragile"
    assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 1."

    async def next_turn() -> bytes:
        # The executor cleans up after a failed turn as the failure is reported; a call racing
        # that clean-up is told ABORTED (retry), never left waiting or given a corrupt state.
        async with asyncio.timeout(5):
            while True:
                try:
                    return (await mesh.invoke(agent, {}, session_id=session)).output
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.ABORTED:
                        raise
                    await asyncio.sleep(0.05)

    # The caller goes away mid-turn, several times (the cancel must reach the execution whether
    # the router is waiting for output or still writing the last message when it comes).
    for turn in range(2, 7):
        call = mesh.router.InvokeStream(
            rt.InvokeRequest(
                agent=f"agents/{agent}",
                session_id=session,
                payload=body({"mode": "sleep", "seconds": 0.8}),
            ),
            metadata=mesh.me,
        )
        assert (await call.read()).WhichOneof("event") == "started"
        call.cancel()
        assert await next_turn() == f"Turn {turn}.".encode()

    # The worker dies mid-turn.
    err = await fails(
        grpc.StatusCode.INTERNAL, mesh.invoke(agent, {"mode": "crash"}, session_id=session)
    )
    assert error_details(err)[0].reason == "SANDBOX_CRASHED" and "crashed" in (
        err.details() or ""
    )
    assert await next_turn() == b"Turn 7."

    # The turn outlives resources.timeout_s.
    err = await fails(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        mesh.invoke(agent, {"mode": "sleep", "seconds": 3}, session_id=session),
    )
    assert error_details(err)[0].reason == "INVOCATION_TIMEOUT" and "timeout_s=1" in (
        err.details() or ""
    )
    assert await next_turn() == b"Turn 8."
    state = await mesh.sessions.GetSessionState(
        ses.GetSessionStateRequest(name=f"sessions/{session}"), metadata=mesh.me
    )
    assert json.loads(state.state) == {"turns": 8} and state.turn_count == 8


async def test_an_agent_that_fails_to_import_is_reported(unchecked: Mesh) -> None:
    mesh = unchecked
    agent = await mesh.publish_agent(
        "broken", "import corral_no_such_module\nfrom corral.sdk import App\napp = App()\n"
    )
    for _ in range(2):  # the failure releases the session: the next call gets the same answer
        err = await fails(
            grpc.StatusCode.INTERNAL, mesh.invoke(agent, {}, session_id=f"{mesh.prefix}-broken")
        )
        assert "ModuleNotFoundError" in (err.details() or "")
        assert "corral_no_such_module" in (err.details() or "")
        assert error_details(err)[0].reason == "AGENT_LOAD_ERROR"
    not_an_app = await mesh.publish_agent("notapp", "app = 42\n")
    err = await fails(grpc.StatusCode.INTERNAL, mesh.invoke(not_an_app, {}))
    assert "TypeError" in (err.details() or "") and "corral.sdk.App" in (err.details() or "")


async def test_a_session_whose_version_cannot_start_is_not_left_behind(unchecked: Mesh) -> None:
    mesh = unchecked
    agent = await mesh.publish_agent("noload", "raise RuntimeError('no start')\n")
    named = f"{mesh.prefix}-noload"
    await fails(grpc.StatusCode.INTERNAL, mesh.invoke(agent, {}, session_id=named))
    await fails(grpc.StatusCode.INTERNAL, mesh.invoke(agent, {}))
    await fails(
        grpc.StatusCode.NOT_FOUND,
        mesh.sessions.GetSession(ses.GetSessionRequest(name=f"sessions/{named}"), metadata=mesh.me),
    )
    listing = await mesh.sessions.ListSessions(ses.ListSessionsRequest(), metadata=mesh.me)
    assert [s.name for s in listing.sessions] == []


async def test_bad_requests_and_unknown_targets(mesh: Mesh) -> None:
    agent = await mesh.publish_examples()
    invoke = mesh.router.Invoke

    def request(payload: bytes = b"{}", **target: str) -> rt.InvokeRequest:
        return rt.InvokeRequest(payload=payload, **{"agent": f"agents/{agent}", **target})  # type: ignore[arg-type]

    invalid = {
        "payload": [request(b""), request(b"x" * (mesh.settings.executor.max_payload_bytes + 1))],
        "agent": [request(agent="progress-report"), request(agent="agents/Bad_Name")],
        "version": [
            request(version="v2"),
            request(version="agents/other/versions/1"),
            request(version="0"),
        ],
        "endpoint": [request(endpoint="no such")],
        "session_id": [request(session_id="has space")],
    }
    for field, requests in invalid.items():
        for req in requests:
            err = await fails(grpc.StatusCode.INVALID_ARGUMENT, invoke(req, metadata=mesh.me))
            assert error_details(err)[1] == [field], (field, err.details())
    err = await fails(grpc.StatusCode.INVALID_ARGUMENT, invoke(request(b""), metadata=mesh.me))
    assert "payload" in (err.details() or "")

    not_found = {
        f"agents/{agent}-nope": request(agent=f"agents/{agent}-nope"),
        f"agents/{agent}/endpoints/nope": request(endpoint="nope"),
        f"agents/{agent}/versions/9": request(version="9"),
    }
    for name, req in not_found.items():
        err = await fails(grpc.StatusCode.NOT_FOUND, invoke(req, metadata=mesh.me))
        assert name in (err.details() or ""), err.details()
    err = await fails(
        grpc.StatusCode.NOT_FOUND, invoke(request(agent=f"agents/{agent}-nope"), metadata=mesh.me)
    )
    # An unknown agent is named as such, not as a missing endpoint to create (DEFAULT cannot be).
    assert (err.details() or "").startswith(f"agents/{agent}-nope does not exist"), err.details()
    # None of them created a session.
    listed = await mesh.sessions.ListSessions(ses.ListSessionsRequest(), metadata=mesh.me)
    assert list(listed.sessions) == []
