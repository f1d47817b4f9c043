"""`corral invoke` retrying a turn safely, against a scripted router on a real socket: a call the
router could not take (UNAVAILABLE, or RESOURCE_EXHAUSTED with a RetryInfo) is sent again under the
same request id, and a stream cut after its start starts over; what is not worth retrying fails at
once. (The real router's answer to such a retry is tests/integration/mesh/test_mesh_request_ids.py
and tests/e2e/test_request_ids.py.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from click.testing import CliRunner, Result
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from corral.cli import State, cli
from corral.router.v1 import router_pb2 as rt
from corral.router.v1 import router_pb2_grpc
from tests.credentials import token
from tests.rpc import new_tenant

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def busy_status(delay_s: int) -> status_pb2.Status:
    retry_info, error_info = any_pb2.Any(), any_pb2.Any()
    retry_info.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=delay_s)))
    error_info.Pack(error_details_pb2.ErrorInfo(reason="REDIS_POOL_EXHAUSTED", domain="sessions"))
    return status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED, message="every connection to Redis is busy",
        details=[error_info, retry_info],
    )


class ScriptedRouter(router_pb2_grpc.RouterServiceServicer):
    """Fails the first attempts as `failures` say, then answers with the turn; marked replayed
    once an attempt was cut after its output (its turn, in this script, committed)."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.request_ids: list[str] = []
        self.cut = False
        # Converse: the session id of each stream's start, and the turns answered.
        self.starts: list[str] = []
        self.turns = 0

    async def InvokeStream(
        self, request: rt.InvokeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[rt.InvokeStreamResponse]:
        self.request_ids.append(request.request_id)
        failure = self.failures.pop(0) if self.failures else ""
        if failure == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the router is restarting")
        if failure == "busy":
            await context.abort_with_status(rpc_status.to_status(busy_status(1)))
        if failure == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "payload is empty")
        info = rt.InvocationInfo(
            session="sessions/s1", version="agents/a/versions/1", invocation_id="inv-1",
            replayed=self.cut,
        )
        yield rt.InvokeStreamResponse(started=info)
        yield rt.InvokeStreamResponse(chunk=rt.OutputChunk(data=b"Turn 1."))
        if failure == "cut":
            self.cut = True
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        yield rt.InvokeStreamResponse(completed=rt.InvocationCompleted(turn=1, duration_ms=3))

    async def Converse(
        self, request_iterator: AsyncIterator[rt.ConverseRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[rt.ConverseResponse]:
        async for message in request_iterator:
            if message.HasField("start"):
                self.starts.append(message.start.session_id)
                continue
            self.request_ids.append(message.turn.request_id)
            failure = self.failures.pop(0) if self.failures else ""
            if failure == "unavailable":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the router is restarting")
            self.turns += 1
            yield rt.ConverseResponse(started=rt.InvocationInfo(session="sessions/s1"))
            if failure == "cut":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            yield rt.ConverseResponse(chunk=rt.OutputChunk(data=f"Turn {self.turns}.".encode()))
            yield rt.ConverseResponse(completed=rt.InvocationCompleted(turn=self.turns))


@pytest_asyncio.fixture
async def router() -> AsyncIterator[tuple[ScriptedRouter, str]]:
    servicer = ScriptedRouter()  # type: ignore[abstract]  # InvokeStream is all it scripts
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def corral_at(address: str, *args: str, stdin: str | None = None) -> Result:
    """`corral <args> --json` against the router at `address`."""

    def run() -> Result:
        state = State()
        try:
            return CliRunner().invoke(
                cli, [*args, "--json"], obj=state, input=stdin, env={
                    "CORRAL_ROUTER_ADDR": address, "CORRAL_TOKEN": token(new_tenant()),
                    "CORRAL_API_KEY": None, "CORRAL_PROFILE": None,
                })
        finally:
            state.client.close()

    return await asyncio.to_thread(run)


async def corral_invoke(address: str, *args: str) -> Result:
    """`corral invoke agent-a -d {} --json <args>` against the router at `address`."""
    return await corral_at(address, "invoke", "agent-a", "-d", "{}", *args)


def printed(result: Result) -> dict[str, object]:
    assert result.exit_code == 0, (result.output, result.exception)
    out: dict[str, object] = json.loads(result.stdout)
    return out


@pytest.mark.parametrize("failures", [("unavailable",), ("busy",), ("unavailable", "unavailable")])
async def test_a_call_the_router_could_not_take_is_sent_again_under_the_same_request_id(
    router: tuple[ScriptedRouter, str], failures: tuple[str, ...],
) -> None:
    servicer, address = router
    servicer.failures = list(failures)
    out = printed(await corral_invoke(address))
    assert out["output"] == "Turn 1." and out["turn"] == 1
    ids = servicer.request_ids
    assert len(ids) == len(failures) + 1 and len(set(ids)) == 1 and len(ids[0]) == 36  # a UUID


async def test_a_stream_cut_after_its_start_is_retried_and_starts_over(
    router: tuple[ScriptedRouter, str],
) -> None:
    servicer, address = router
    servicer.failures = ["cut"]
    out = printed(await corral_invoke(address))
    # The output is the retry's alone, not the failed attempt's and the retry's together.
    assert out["output"] == "Turn 1." and out["replayed"] is True
    assert len(servicer.request_ids) == 2 and len(set(servicer.request_ids)) == 1


async def test_a_request_id_can_be_given_and_each_call_gets_its_own(
    router: tuple[ScriptedRouter, str],
) -> None:
    servicer, address = router
    printed(await corral_invoke(address, "--request-id", "order-42"))
    printed(await corral_invoke(address))
    printed(await corral_invoke(address))
    given, first, second = servicer.request_ids
    assert given == "order-42" and first != second


async def test_what_is_not_worth_retrying_fails_at_once(router: tuple[ScriptedRouter, str]) -> None:
    servicer, address = router
    servicer.failures = ["invalid"]
    result = await corral_invoke(address)
    assert isinstance(result.exception, grpc.RpcError)
    assert result.exception.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(servicer.request_ids) == 1


@pytest.mark.parametrize(("failure", "second_start"), [("unavailable", ""), ("cut", "s1")])
async def test_a_conversation_whose_stream_broke_goes_on_in_a_new_one(
    router: tuple[ScriptedRouter, str], failure: str, second_start: str,
) -> None:
    servicer, address = router
    servicer.failures = [failure]
    result = await corral_at(address, "chat", "agent-a", stdin="hello\nagain\n")
    assert result.exit_code == 0, (result.output, result.exception)
    transcript = json.loads(result.stdout)
    # Each turn shown once: the retried one's output, not the broken attempt's beside it.
    last = servicer.turns
    assert [t["output"] for t in transcript] == [f"Turn {last - 1}.", f"Turn {last}."]
    first, retried, second = servicer.request_ids
    # The broken turn went again under its request id, on a stream that continues the session
    # once the first one had said which it is; the next turn has an id of its own.
    assert first == retried and second != first
    assert servicer.starts == ["", second_start]
