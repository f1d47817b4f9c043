"""All five services in-process on real PostgreSQL and Redis, driven through the router as a
user would: versions, splits and pins, a conversation over one stream, and the one trace an
invocation leaves in telemetry."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from corral.registry.v1 import registry_pb2 as reg
from corral.router.v1 import router_pb2 as rt
from corral.router.v1 import router_pb2_grpc
from corral.sessions.v1 import sessions_pb2 as ses
from corral.telemetry.v1 import telemetry_pb2 as tel
from services.common import tracing
from services.common.settings import Settings
from tests import harness
from tests.bundles import BEHAVIOUR
from tests.credentials import public_channel
from tests.mesh import Mesh, connect, version_of
from tests.rpc import body, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


# -- versions, splits and pins ----------------------------------------------------------------


async def test_turns_see_state_and_sessions_keep_their_version_through_split_changes(
    mesh: Mesh,
) -> None:
    agent = await mesh.publish_examples()
    prod = await mesh.set_split(agent, "prod", [(1, 50), (2, 50)])

    first = await mesh.invoke(
        agent,
        {"text": "Client reports sleeping better."},
        endpoint="prod",
        session_id=f"{mesh.prefix}-s1",
    )
    assert first.info.session == f"sessions/{mesh.prefix}-s1" and first.info.new_session
    assert first.info.endpoint == f"agents/{agent}/endpoints/prod"
    assert first.output.startswith(b"Turn 1. ") and first.completed.turn == 1
    pinned = first.info.version

    # The second turn, streamed, sees the first turn's state and stays on the same version.
    events = [
        e
        async for e in mesh.router.InvokeStream(
            rt.InvokeRequest(
                agent=f"agents/{agent}",
                endpoint="prod",
                session_id=f"{mesh.prefix}-s1",
                payload=body({"text": "Mood improved."}),
            ),
            metadata=mesh.me,
        )
    ]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "completed" and set(kinds[1:-1]) == {"chunk"}
    assert events[0].started.version == pinned and not events[0].started.new_session
    assert b"".join(e.chunk.data for e in events[1:-1]).startswith(b"Turn 2. ")
    assert events[-1].completed.turn == 2

    # 200 new sessions at 50/50 land on both versions.
    gate = asyncio.Semaphore(8)

    async def new_session() -> rt.InvokeResponse:
        async with gate:
            return await mesh.invoke(agent, endpoint="prod")

    responses = await asyncio.gather(*(new_session() for _ in range(200)))
    counts = Counter(version_of(r) for r in responses)
    assert counts[1] >= 60 and counts[2] >= 60, counts
    assert all(r.output.startswith(b"Turn 1. ") and r.info.new_session for r in responses)
    on_v2 = [r.info.session for r in responses if version_of(r) == 2][:3]

    # Everything new to version 1 now; the sessions already on version 2 stay there.
    await mesh.set_split(agent, "prod", [(1, 100)])
    assert (
        await mesh.registry.GetEndpoint(reg.GetEndpointRequest(name=prod.name))
    ).revision == prod.revision + 1
    later = await asyncio.gather(*(new_session() for _ in range(20)))
    assert {version_of(r) for r in later} == {1}
    for session in on_v2:
        again = await mesh.invoke(
            agent, endpoint="prod", session_id=session.removeprefix("sessions/")
        )
        assert version_of(again) == 2 and again.output.startswith(b"Turn 2. ")
    again = await mesh.invoke(agent, endpoint="prod", session_id=f"{mesh.prefix}-s1")
    assert again.info.version == pinned and again.output.startswith(b"Turn 3. ")
    stored = await mesh.sessions.GetSession(
        ses.GetSessionRequest(name=f"sessions/{mesh.prefix}-s1"), metadata=mesh.me
    )
    assert stored.version == pinned and stored.turn_count == 3

    # An explicit version qualifier bypasses the endpoint for a new session.
    explicit = await mesh.invoke(agent, version="2")
    assert explicit.info.version == f"agents/{agent}/versions/2" and explicit.info.endpoint == ""
    assert b"S: " in explicit.output  # version 2 writes SOAP notes
    explicit = await mesh.invoke(agent, version=f"agents/{agent}/versions/1", endpoint="prod")
    assert version_of(explicit) == 1 and b"Progress note (draft)" in explicit.output


async def test_converse_keeps_one_session_over_a_stream(mesh: Mesh) -> None:
    agent = await mesh.publish_examples()
    queue: asyncio.Queue[rt.ConverseRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[rt.ConverseRequest]:
        while (message := await queue.get()) is not None:
            yield message

    stream = mesh.router.Converse(requests(), metadata=mesh.me)
    await queue.put(
        rt.ConverseRequest(start=rt.ConverseStart(agent=f"agents/{agent}", version="2"))
    )
    turns: list[tuple[rt.InvocationInfo, bytes, int]] = []
    for text in ("Client slept badly.", "Client slept better.", "Client is rested."):
        await queue.put(rt.ConverseRequest(turn=rt.Turn(payload=body({"text": text}))))
        started, output = None, b""
        while True:
            event = await asyncio.wait_for(stream.read(), 10)
            assert event is not grpc.aio.EOF
            kind = event.WhichOneof("event")
            if kind == "started":
                started = event.started
            elif kind == "chunk":
                output += event.chunk.data
            else:
                assert started is not None
                turns.append((started, output, event.completed.turn))
                break
    await queue.put(None)
    assert await stream.read() is grpc.aio.EOF
    assert await stream.code() == grpc.StatusCode.OK
    assert [t[1].split(b".")[0] for t in turns] == [b"Turn 1", b"Turn 2", b"Turn 3"]
    assert [t[2] for t in turns] == [1, 2, 3]
    assert len({t[0].session for t in turns}) == 1
    assert [t[0].new_session for t in turns] == [True, False, False]
    assert {t[0].version for t in turns} == {f"agents/{agent}/versions/2"}


async def test_a_router_that_has_not_seen_a_session_follows_its_pin(
    mesh: Mesh,
) -> None:
    agent = await mesh.publish_agent("pinned", BEHAVIOUR)
    session = f"{mesh.prefix}-pinned"
    await mesh.invoke(agent, {}, session_id=session)
    # A second router (a replica, or this one restarted) knows nothing of the session, and is
    # asked through an endpoint that does not exist: the session's pin decides.
    host = await harness.start_service("router", mesh.settings)
    try:
        async with public_channel(host.address) as channel:
            reply = await router_pb2_grpc.RouterServiceStub(channel).Invoke(
                rt.InvokeRequest(agent=f"agents/{agent}", endpoint="nowhere", session_id=session,
                                 payload=body({})), metadata=mesh.me)
    finally:
        await host.stop(grace=0.5)
    assert reply.output == b"Turn 2." and not reply.info.new_session


# -- spans ------------------------------------------------------------------------------------


async def test_an_invocation_is_one_trace_in_telemetry(settings: Settings, tmp_path: Path) -> None:
    # Tracing on for this mesh only. The agent's own spans are forwarded by the executor itself;
    # the executor's invoke_agent and model spans go through OpenTelemetry's global tracer
    # provider, which services.common.tracing.setup installs once per process (the service entry
    # points call it; in-process tests must). This is the one test that installs it, exporting to
    # this test's telemetry; it is shut down at the end, after which spans are dropped.
    assert tracing._provider is None, "another test installed the global tracer provider first"
    traced = harness.with_tracing(settings)
    platform = await harness.start_mesh(traced)
    tracing.setup("executor", platform.settings)
    try:
        async with connect(platform.settings, platform.hosts, tmp_path) as mesh:
            agent = await mesh.publish_examples()
            await mesh.set_split(agent, "prod", [(1, 100)])
            session = f"{mesh.prefix}-traced"
            infos = [
                (await mesh.invoke(agent, endpoint="prod", session_id=session)).info
                for _ in range(2)
            ]
            query = tel.ListSpansRequest(filter=tel.SpanFilter(session=f"sessions/{session}"))
            async with asyncio.timeout(10):
                while True:
                    spans = (await mesh.telemetry.ListSpans(query, metadata=mesh.me)).spans
                    if len(spans) >= 6:
                        break
                    await asyncio.sleep(0.1)
            assert sorted(s.name for s in spans) == sorted(
                [f"invoke_agent {agent}", "chat scripted-1", "draft_note"] * 2
            )
            for span in spans:
                assert span.agent == f"agents/{agent}"
                assert span.version == f"agents/{agent}/versions/1"
                assert span.endpoint == f"agents/{agent}/endpoints/prod"
                assert span.tenant == mesh.tenant
                assert span.status != tel.SPAN_STATUS_ERROR
            # Each invocation is one trace, the one the caller was told, rooted at invoke_agent.
            for turn, info in enumerate(infos, start=1):
                trace = [s for s in spans if s.trace_id == info.trace_id]
                root = next(s for s in trace if s.name.startswith("invoke_agent"))
                assert root.service == "corral-executor" and root.status == tel.SPAN_STATUS_OK
                assert root.attributes["corral.turn"] == turn
                assert root.attributes["corral.invocation"] == info.invocation_id
                children = {s.name: s for s in trace if s is not root}
                assert set(children) == {"chat scripted-1", "draft_note"}
                assert {s.parent_span_id for s in children.values()} == {root.span_id}
                assert children["draft_note"].service == f"agent-{agent}"
                assert children["draft_note"].attributes["progress_report.turn"] == turn
                assert (
                    children["chat scripted-1"].attributes["gen_ai.request.model"] == "scripted-1"
                )
            # Another tenant sees none of them.
            other = await mesh.telemetry.ListSpans(query, metadata=who(mesh.tenant + "-x"))
            assert list(other.spans) == []
    finally:
        tracing.shutdown()
        await platform.stop()
