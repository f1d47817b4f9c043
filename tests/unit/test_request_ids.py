"""Request ids (AIP-155), the pure parts: their shape, the digest that tells a retry from another
request, the session a request with no session lands in, the router resolving it, the executor
answering a committed request from its record without running the agent, and the client's retry
rules (what is retried, how long it waits, the same request id every time). No sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.context import Context as OtelContext

from corral import retries
from corral.names import SessionRef, valid_session_id
from services.common.errors import Aborted, FailedPrecondition, NotFound, PermissionDenied
from services.common.execution import Completed, Started
from services.common.requests import REQUEST_IDS, request_digest, session_for_request
from services.executor.model import Invocation, ModelHandler, ToolHandler, TurnInput, TurnOutput
from services.router.model import Target
from services.sessions.model import SessionKey, TurnResult
from services.sessions.model import Turn as SessionTurn
from services.sessions.model import TurnRequest as SessionTurnRequest
from services.sessions.requests import TurnResults, replayable
from services.sessions.sessions import Sessions
from tests.fakes.common import FakeClock, SequentialIds
from tests.fakes.executor import FakeWorker
from tests.fakes.sessions import MemoryLeases, MemoryStore, MemoryTurnResults
from tests.unit.test_executor_domain import ALICE as EXECUTOR_ALICE
from tests.unit.test_executor_domain import World as ExecutorWorld
from tests.unit.test_router_domain import (
    AGENT,
    ALICE,
    ALICE_OF_BETA,
    PROD,
    V1,
    world,  # noqa: F401 - the router's fixture
)
from tests.unit.test_router_domain import World as RouterWorld
from tests.unit.test_sessions_domain import ALICE as SESSIONS_ALICE
from tests.unit.test_sessions_domain import BOB as SESSIONS_BOB
from tests.unit.test_sessions_domain import SPEC

pytestmark = pytest.mark.timeout(20)


# -- the rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["0b4d5c1e-9b0a-4c4e-8f53-1f1d1d1d1d1d", "a", "run:7~retry.2_x"])
def test_uuids_and_plain_tokens_are_request_ids(request_id: str) -> None:
    assert REQUEST_IDS.valid(request_id)


@pytest.mark.parametrize("request_id", ["", "-leading", "has space", "a/b", "é", "x" * 129])
def test_other_strings_are_not(request_id: str) -> None:
    assert not REQUEST_IDS.valid(request_id)


def test_the_digest_covers_the_payload_and_its_content_type() -> None:
    one = request_digest(b'{"a": 1}', "application/json")
    assert one == request_digest(b'{"a": 1}', "application/json")
    assert one != request_digest(b'{"a": 2}', "application/json")
    assert one != request_digest(b'{"a": 1}', "text/plain")
    # The separator keeps a content type's tail from passing for the payload's head.
    assert request_digest(b"b", "a") != request_digest(b"", "ab")


def test_a_request_ids_session_is_the_same_every_time_and_per_tenant() -> None:
    session = session_for_request("acme", "r-1")
    assert session == session_for_request("acme", "r-1") and valid_session_id(session)
    assert session != session_for_request("beta", "r-1")
    assert session != session_for_request("acme", "r-2")


def result(digest: str) -> TurnResult:
    return TurnResult(
        turn=3, output=b"out", content_type="application/json", version="agents/a/versions/1",
        invocation_id="inv", trace_id="t", commit_time=datetime.now(UTC), digest=digest,
    )


def test_a_recorded_turn_answers_only_the_same_request() -> None:
    same = request_digest(b"{}", "application/json")
    assert replayable(result(same), same, "r-1").output == b"out"
    with pytest.raises(FailedPrecondition) as refused:
        replayable(result(same), request_digest(b"[]", "application/json"), "r-1")
    assert refused.value.reason == "REQUEST_ID_REUSED" and "r-1" in str(refused.value)


# -- the router: a request with no session --------------------------------------------------------


async def test_a_request_id_with_no_session_creates_its_own_and_its_retry_finds_it(
    world: RouterWorld,  # noqa: F811
) -> None:
    first = await world.router.resolve(ALICE, Target(AGENT, PROD), "r-1")
    assert first.new_session
    assert first.pin.session == SessionRef(session_for_request("acme", "r-1"))
    # The retry, through another router (no cached pin), lands in the same session.
    again = await world.fresh_router().resolve(ALICE, Target(AGENT, PROD), "r-1")
    assert again.pin.session == first.pin.session and not again.new_session
    # Another tenant's request under the same id has a session of its own.
    theirs = await world.router.resolve(ALICE_OF_BETA, Target(AGENT, version=V1), "r-1")
    assert theirs.pin.session != first.pin.session and theirs.new_session
    # Without a request id, a new session each time.
    plain = {(await world.router.resolve(ALICE, Target(AGENT, PROD))).pin.session for _ in range(2)}
    assert len(plain) == 2


async def test_the_router_forwards_the_request_id(world: RouterWorld) -> None:  # noqa: F811
    events = world.router.invoke(ALICE, Target(AGENT, PROD), b"{}", "", (), "r-9")
    [_ async for _ in events]
    (invocation,) = world.executor.invocations
    assert invocation.request_id == "r-9"


# -- the executor: a committed request is answered from its record ------------------------------


async def counting(
    turn: TurnInput, model: ModelHandler, tools: ToolHandler, worker: FakeWorker
) -> AsyncIterator[bytes | TurnOutput]:
    yield b"ran " + turn.payload
    yield TurnOutput(turn.state + b"+")


@pytest.fixture
async def executor(tmp_path: Path) -> AsyncIterator[ExecutorWorld]:
    w = ExecutorWorld(tmp_path, counting)
    w.executor.start()
    yield w
    await w.executor.close()


def under(w: ExecutorWorld, request_id: str, payload: bytes = b"a") -> Invocation:
    plain = w.invocation("s1", payload)
    return Invocation(
        session=plain.session, version=plain.version, digest=plain.digest, endpoint=plain.endpoint,
        invocation_id=f"{plain.invocation_id}-{request_id}", payload=payload,
        content_type=plain.content_type, request_id=request_id,
    )


async def run(w: ExecutorWorld, inv: Invocation) -> list[object]:
    return [e async for e in w.executor.execute(EXECUTOR_ALICE, inv, OtelContext())]


async def test_a_committed_request_is_replayed_without_running_the_agent(
    executor: ExecutorWorld,
) -> None:
    first = await run(executor, under(executor, "r-1"))
    assert first[1] == b"ran a" and isinstance(first[0], Started) and not first[0].replayed
    again = await run(executor, under(executor, "r-1"))
    started, output, completed = again
    assert isinstance(started, Started) and started.replayed
    assert started.invocation_id == executor.sessions.commits[0].invocation_id  # the first run's
    assert output == b"ran a" and isinstance(completed, Completed) and completed.turn == 1
    (sandbox,) = executor.starter.started
    assert len(sandbox.turns) == 1 and len(executor.sessions.commits) == 1  # the agent ran once
    # Another payload under the id is refused; a new id runs.
    with pytest.raises(FailedPrecondition):
        await run(executor, under(executor, "r-1", b"b"))
    assert (await run(executor, under(executor, "r-2", b"b")))[1] == b"ran b"
    assert len(sandbox.turns) == 2


async def test_a_retry_while_its_first_attempt_runs_is_told_so(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow(
        turn: TurnInput, model: ModelHandler, tools: ToolHandler, worker: FakeWorker
    ) -> AsyncIterator[bytes | TurnOutput]:
        await release.wait()
        yield TurnOutput(b"")

    w = ExecutorWorld(tmp_path, slow)
    w.executor.start()
    try:
        first = asyncio.ensure_future(run(w, under(w, "r-1")))
        while not w.starter.started:
            await asyncio.sleep(0.01)
        with pytest.raises(Aborted) as busy:
            await run(w, under(w, "r-1"))
        assert busy.value.reason == "REQUEST_IN_PROGRESS"
        with pytest.raises(Aborted) as other:
            await run(w, under(w, "r-2"))
        assert other.value.reason == "SESSION_BUSY"
        release.set()
        await first
    finally:
        await w.executor.close()


# -- the client's retries -----------------------------------------------------------------------


class Failure(grpc.RpcError):
    """A failed call as grpc raises it, with the google.rpc.Status a Corral service attaches."""

    def __init__(self, code: grpc.StatusCode, reason: str = "", delay_s: float | None = None) -> None:
        details = []
        if reason:
            packed = any_pb2.Any()
            packed.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="router"))
            details.append(packed)
        if delay_s is not None:
            packed = any_pb2.Any()
            packed.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
                seconds=int(delay_s), nanos=int(delay_s % 1 * 1e9))))
            details.append(packed)
        self._code = code
        self._status = status_pb2.Status(code=code.value[0], message="failed", details=details)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "failed"

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:  # type: ignore[override]
        return (("grpc-status-details-bin", self._status.SerializeToString()),)


@pytest.mark.parametrize(("failure", "retried"), [
    (Failure(grpc.StatusCode.UNAVAILABLE), True),
    (Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "REDIS_POOL_EXHAUSTED", delay_s=0.5), True),
    (Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "MEMORY_LIMIT"), False),
    (Failure(grpc.StatusCode.ABORTED, "REQUEST_IN_PROGRESS"), True),
    (Failure(grpc.StatusCode.ABORTED, "REQUEST_ALREADY_COMMITTED"), True),
    (Failure(grpc.StatusCode.ABORTED, "SESSION_BUSY"), False),
    (Failure(grpc.StatusCode.INTERNAL, "AGENT_ERROR"), False),
    (Failure(grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ID_REUSED"), False),
    (ValueError("not a call"), False),
])
def test_what_the_client_retries(failure: BaseException, retried: bool) -> None:
    assert retries.retryable(failure) is retried


def test_the_wait_is_bounded_and_honours_retry_info() -> None:
    policy = retries.RetryPolicy(attempts=3, first_s=0.1, max_s=0.4)
    waits: list[float] = []
    attempts = iter([
        Failure(grpc.StatusCode.UNAVAILABLE),
        Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "DATABASE_POOL_EXHAUSTED", delay_s=2.5),
    ])

    def attempt() -> str:
        failure = next(attempts, None)
        if failure is not None:
            raise failure
        return "done"

    retrying = policy.retrying()
    retrying.sleep = waits.append
    for retry in retrying:
        with retry:
            outcome = attempt()
    assert outcome == "done"
    assert len(waits) == 2 and waits[0] <= 0.4 + 1e-9 and waits[1] == 2.5


def test_a_call_gives_up_after_its_attempts_with_the_last_failure() -> None:
    calls: list[int] = []

    def attempt() -> str:
        calls.append(1)
        raise Failure(grpc.StatusCode.UNAVAILABLE)

    with pytest.raises(Failure):
        retries.call(retries.RetryPolicy(attempts=3, first_s=0.001, max_s=0.001), attempt)
    assert len(calls) == 3
    # What is not worth retrying fails at once.
    calls.clear()

    def refused() -> str:
        calls.append(1)
        raise Failure(grpc.StatusCode.INVALID_ARGUMENT)

    with pytest.raises(Failure):
        retries.call(retries.RetryPolicy(attempts=3, first_s=0.001), refused)
    assert len(calls) == 1


def test_a_stream_that_fails_is_opened_again_and_starts_over() -> None:
    opened: list[int] = []

    def attempt() -> Iterator[str]:
        opened.append(1)
        yield "started"
        if len(opened) == 1:
            raise Failure(grpc.StatusCode.UNAVAILABLE)
        yield "completed"

    policy = retries.RetryPolicy(attempts=3, first_s=0.001, max_s=0.001)
    assert list(retries.stream(policy, attempt)) == ["started", "started", "completed"]


# -- sessions: recorded with the commit, found by the session's writers, forgotten in time -----


async def test_sessions_record_a_request_ids_turn_once_and_answer_only_its_writers() -> None:
    store, clock = MemoryStore(), FakeClock()
    sessions = Sessions(store, MemoryLeases(clock), clock, SequentialIds())
    results = TurnResults(MemoryTurnResults(store), store, retention_s=3600, clock=clock)
    await sessions.create(SESSIONS_ALICE, SessionRef("s"), SPEC)
    lease = await sessions.acquire_lease(SESSIONS_ALICE, SessionRef("s"), "h", None)
    assert lease.state is not None
    digest = request_digest(b"hi", "text/plain")
    request = SessionTurnRequest("r-1", digest, "text/plain", "t1")
    saved = await sessions.commit_turn(SESSIONS_ALICE, SessionRef("s"), lease.lease_id,
                                       lease.state.etag, b"1", SessionTurn("inv1", b"hi", b"yo", request))
    found = await results.lookup(SESSIONS_ALICE, SessionRef("s"), "r-1", digest)
    assert found is not None and (found.turn, found.output, found.invocation_id) == (1, b"yo", "inv1")
    # A second commit under the id changes nothing.
    with pytest.raises(Aborted) as twice:
        await sessions.commit_turn(SESSIONS_ALICE, SessionRef("s"), lease.lease_id, saved.etag,
                                   b"2", SessionTurn("inv2", b"hi", b"again", request))
    assert twice.value.reason == "REQUEST_ALREADY_COMMITTED"
    assert store.records[SessionKey("acme", "s")].turn_count == 1
    # Another invoker of the tenant may not continue alice's session, so may not read its turns.
    with pytest.raises(PermissionDenied):
        await results.lookup(SESSIONS_BOB, SessionRef("s"), "r-1", digest)
    with pytest.raises(NotFound):
        await results.lookup(SESSIONS_ALICE, SessionRef("nope"), "r-1", digest)
    # Past the retention time a retry finds nothing, and the sweep deletes the result.
    clock.advance(3601)
    assert await results.lookup(SESSIONS_ALICE, SessionRef("s"), "r-1", digest) is None
    await results.sweep()
    assert store.results == {}
