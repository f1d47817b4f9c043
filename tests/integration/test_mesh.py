"""All five services in-process on real PostgreSQL and Redis, driven through the router as a
user would: versions, splits and pins, sessions with state, failures and their statuses, tenants,
the sandbox process, restarts and the agent's spans."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import psutil
import pytest

from corral.executor.v1 import executor_pb2
from corral.registry.v1 import registry_pb2 as reg
from corral.router.v1 import router_pb2 as rt
from corral.router.v1 import router_pb2_grpc
from corral.sessions.v1 import sessions_pb2 as ses
from corral.telemetry.v1 import telemetry_pb2 as tel
from services.common import tracing
from services.common.settings import Settings
from tests import harness
from tests.bundles import BEHAVIOUR, copy_example
from tests.conftest import StartServices
from tests.mesh import EXAMPLES, Mesh, connect, version_of
from tests.rpc import body, error_details, fails, who

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


# -- failures ---------------------------------------------------------------------------------


async def test_a_second_call_on_a_busy_session_is_aborted(mesh: Mesh) -> None:
    agent = await mesh.publish_agent("sleepy", BEHAVIOUR)
    session = f"{mesh.prefix}-busy"
    assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 1."

    async def slow() -> rt.InvokeResponse:
        return await mesh.invoke(agent, {"mode": "sleep", "seconds": 1.5}, session_id=session)

    first = asyncio.create_task(slow())
    await asyncio.sleep(0.3)  # the first call is running in the sandbox
    err = await fails(grpc.StatusCode.ABORTED, slow())
    info, _ = error_details(err)
    assert info.reason == "SESSION_BUSY" and "busy" in (err.details() or "")
    assert (await first).output == b"Turn 2. Slept."
    # Both racing at once: exactly one runs.
    results = await asyncio.gather(slow(), slow(), return_exceptions=True)
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(errors) == 1 and errors[0].code() == grpc.StatusCode.ABORTED, results
    assert error_details(errors[0])[0].reason == "SESSION_BUSY"
    # The busy refusals did not disturb the session.
    assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 4."


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


async def test_an_agent_that_fails_to_import_is_reported(mesh: Mesh) -> None:
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


async def test_sessions_belong_to_their_tenant_and_end_when_stopped(mesh: Mesh) -> None:
    agent = await mesh.publish_examples()
    session = f"{mesh.prefix}-owned"
    await mesh.invoke(agent, session_id=session)
    intruders = (who(mesh.tenant + "-b"), who(mesh.tenant, "bob"))
    for intruder in intruders:
        err = await fails(
            grpc.StatusCode.PERMISSION_DENIED,
            mesh.invoke(agent, metadata=intruder, session_id=session),
        )
        assert f"sessions/{session}" in (err.details() or "")
        await fails(
            grpc.StatusCode.PERMISSION_DENIED,
            mesh.router.StopSession(
                rt.StopSessionRequest(name=f"sessions/{session}"), metadata=intruder
            ),
        )
    # A router that has not seen the session (no cached pin) refuses them too.
    await mesh.hosts["router"].stop(grace=0.5)
    mesh.hosts["router"] = await harness.restart(mesh.hosts["router"])
    for intruder in intruders:
        await fails(
            grpc.StatusCode.PERMISSION_DENIED,
            mesh.invoke(agent, metadata=intruder, session_id=session),
        )
    # The intruders changed nothing.
    assert (await mesh.invoke(agent, session_id=session)).output.startswith(b"Turn 2. ")
    sandboxes = await mesh.sandboxes()
    assert f"sessions/{session}" in {s.session for s in sandboxes}

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
        reg.GetEndpointRequest(name=f"agents/{agent}/endpoints/DEFAULT")
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
        async with grpc.aio.insecure_channel(host.address) as channel:
            reply = await router_pb2_grpc.RouterServiceStub(channel).Invoke(
                rt.InvokeRequest(agent=f"agents/{agent}", endpoint="nowhere", session_id=session,
                                 payload=body({})), metadata=mesh.me)
    finally:
        await host.stop(grace=0.5)
    assert reply.output == b"Turn 2." and not reply.info.new_session
