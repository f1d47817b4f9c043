"""Request ids (AIP-155) through the router, all five services in-process on real PostgreSQL and
Redis: a turn whose reply was lost, retried under its request id, comes back as its committed
result and is not run again; another payload under the same id is refused; a request id with no
session lands a retry in the same new session."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from corral.router.v1 import router_pb2 as rt
from corral.sessions.v1 import sessions_pb2 as ses
from services.common.requests import session_for_request
from tests.bundles import BEHAVIOUR
from tests.mesh import Mesh
from tests.rpc import body, error_details, fails

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def turns_run(mesh: Mesh, session: str) -> int:
    """How many turns the agent really ran in the session: it counts them in its own state."""
    state = await mesh.sessions.GetSessionState(
        ses.GetSessionStateRequest(name=session), metadata=mesh.me
    )
    return int(json.loads(state.state)["turns"])


async def turn_count(mesh: Mesh, session: str) -> int:
    """The session's committed turns; 0 while it does not exist yet."""
    try:
        got = await mesh.sessions.GetSession(ses.GetSessionRequest(name=session), metadata=mesh.me)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return 0
    return got.turn_count


async def test_a_turn_whose_reply_was_lost_is_not_run_again(mesh: Mesh) -> None:
    agent = await mesh.publish_agent("lost", BEHAVIOUR)
    session = f"sessions/{mesh.prefix}-lost"
    request = rt.InvokeRequest(
        agent=f"agents/{agent}", session_id=f"{mesh.prefix}-lost", payload=body({}),
        request_id=str(uuid.uuid4()),
    )
    # The caller opens the stream and never reads it; once the turn has committed, it gives up,
    # so it saw none of the reply: the commit happened, the caller cannot know.
    call = mesh.router.InvokeStream(request, metadata=mesh.me)
    for _ in range(200):
        if await turn_count(mesh, session) == 1:
            break
        await asyncio.sleep(0.05)
    assert await turn_count(mesh, session) == 1
    call.cancel()

    # Its retry, under the same request id, gets the committed turn's result.
    again = await mesh.router.Invoke(request, metadata=mesh.me)
    assert again.output == b"Turn 1." and again.completed.turn == 1
    assert again.info.replayed and again.info.session == session
    # Streamed, the same.
    events = [e async for e in mesh.router.InvokeStream(request, metadata=mesh.me)]
    assert events[0].started.replayed
    assert events[0].started.invocation_id == again.info.invocation_id
    assert b"".join(e.chunk.data for e in events if e.HasField("chunk")) == b"Turn 1."
    assert events[-1].completed.turn == 1
    # The agent ran once.
    assert await turns_run(mesh, session) == 1 and await turn_count(mesh, session) == 1

    # The same id with another payload is refused, and runs nothing.
    reused = rt.InvokeRequest()
    reused.CopyFrom(request)
    reused.payload = body({"text": "something else"})
    err = await fails(grpc.StatusCode.FAILED_PRECONDITION, mesh.router.Invoke(reused, metadata=mesh.me))
    assert error_details(err)[0].reason == "REQUEST_ID_REUSED"
    assert "request_id" in (err.details() or "")
    # A new request id is a new turn.
    reused.request_id = str(uuid.uuid4())
    fresh = await mesh.router.Invoke(reused, metadata=mesh.me)
    assert fresh.output == b"Turn 2." and not fresh.info.replayed
    assert await turns_run(mesh, session) == 2


async def test_a_request_id_without_a_session_lands_its_retry_in_the_same_session(
    mesh: Mesh,
) -> None:
    agent = await mesh.publish_agent("fresh", BEHAVIOUR)
    request_id = str(uuid.uuid4())
    request = rt.InvokeRequest(agent=f"agents/{agent}", payload=body({}), request_id=request_id)
    first = await mesh.router.Invoke(request, metadata=mesh.me)
    assert first.info.new_session and not first.info.replayed and first.output == b"Turn 1."
    assert first.info.session == f"sessions/{session_for_request(mesh.tenant, request_id)}"

    again = await mesh.router.Invoke(request, metadata=mesh.me)
    assert again.info.session == first.info.session and again.info.replayed
    assert again.output == b"Turn 1." and again.info.invocation_id == first.info.invocation_id
    assert await turns_run(mesh, first.info.session) == 1


async def test_a_retry_while_the_first_attempt_runs_is_told_to_wait(mesh: Mesh) -> None:
    agent = await mesh.publish_agent("slow", BEHAVIOUR)
    request = rt.InvokeRequest(
        agent=f"agents/{agent}", session_id=f"{mesh.prefix}-slow",
        payload=body({"mode": "sleep", "seconds": 1.5}), request_id=str(uuid.uuid4()),
    )
    first = asyncio.ensure_future(mesh.router.Invoke(request, metadata=mesh.me))
    await asyncio.sleep(0.5)  # the first attempt is running in the sandbox
    err = await fails(grpc.StatusCode.ABORTED, mesh.router.Invoke(request, metadata=mesh.me))
    assert error_details(err)[0].reason == "REQUEST_IN_PROGRESS"
    done = await first
    assert done.output == b"Turn 1. Slept." and not done.info.replayed
    again = await mesh.router.Invoke(request, metadata=mesh.me)
    assert again.info.replayed and again.output == done.output
    assert await turns_run(mesh, f"sessions/{mesh.prefix}-slow") == 1


async def test_converse_turns_carry_request_ids(mesh: Mesh) -> None:
    agent = await mesh.publish_agent("talk", BEHAVIOUR)
    turn = rt.Turn(payload=body({}), request_id=str(uuid.uuid4()))

    async def conversation(*turns: rt.Turn) -> list[rt.ConverseResponse]:
        async def requests() -> AsyncIterator[rt.ConverseRequest]:
            yield rt.ConverseRequest(start=rt.ConverseStart(agent=f"agents/{agent}"))
            for t in turns:
                yield rt.ConverseRequest(turn=t)

        return [e async for e in mesh.router.Converse(requests(), metadata=mesh.me)]

    first = await conversation(turn, rt.Turn(payload=body({}), request_id=str(uuid.uuid4())))
    session = first[0].started.session
    assert session == f"sessions/{session_for_request(mesh.tenant, turn.request_id)}"
    # The conversation again (its stream was lost): the first turn is replayed, not run.
    retried = await conversation(turn)
    assert retried[0].started.replayed and retried[0].started.session == session
    assert retried[-1].completed.turn == 1
    assert await turns_run(mesh, session) == 2


async def test_a_malformed_request_id_is_refused(mesh: Mesh) -> None:
    agent = await mesh.publish_agent("bad", BEHAVIOUR)
    err = await fails(grpc.StatusCode.INVALID_ARGUMENT, mesh.router.Invoke(
        rt.InvokeRequest(agent=f"agents/{agent}", payload=body({}), request_id="no spaces/here"),
        metadata=mesh.me,
    ))
    assert error_details(err)[1] == ["request_id"]
