"""The openai provider against a small OpenAI-compatible server started here (aiohttp on a free
port): plain and streamed answers, params, retries within a deadline, errors and the chat span."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from services.executor.broker import ModelBroker
from services.executor.model import ModelAnswer, ModelRequest
from services.executor.openai_provider import OpenAIProvider
from tests.harness import refused_address

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

API_KEY = "sk-test-0123456789abcdef"
Reply = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


@dataclass
class FakeServer:
    """Answers each POST /v1/chat/completions with the next scripted reply (the last one
    repeats), and records what it received."""

    url: str
    replies: list[Reply] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    @property
    def hits(self) -> int:
        return len(self.bodies)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        reply = self.replies[min(len(self.bodies), len(self.replies)) - 1]
        return await reply(request, body)


def answer(text: str, usage: tuple[int, int] | None = (7, 3)) -> Reply:
    async def reply(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        payload: dict[str, Any] = {
            "id": "chatcmpl-1", "object": "chat.completion", "model": body["model"] + "-0613",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
        }
        if usage:
            payload["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                "total_tokens": sum(usage)}
        return web.json_response(payload)

    return reply


def stream(
    parts: list[str], usage: tuple[int, int] | None = (7, 4), then: str = "done"
) -> Reply:
    """SSE the way OpenAI sends it: a role delta, the content deltas, a usage-only chunk when
    asked for, [DONE]. then="drop" ends the connection after the first content delta."""

    async def reply(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def event(data: dict[str, Any] | str) -> None:
            text = data if isinstance(data, str) else json.dumps(data)
            await response.write(f"data: {text}\n\n".encode())

        def delta(d: dict[str, str]) -> dict[str, Any]:
            return {"object": "chat.completion.chunk", "model": body["model"] + "-0613",
                    "choices": [{"index": 0, "delta": d, "finish_reason": None}]}

        await response.write(b": keep-alive comment\n\n")
        await event(delta({"role": "assistant"}))
        for part in parts:
            await event(delta({"content": part}))
            if then == "drop":
                request.transport.close()  # type: ignore[union-attr]
                return response
        if usage and body.get("stream_options", {}).get("include_usage"):
            await event({"object": "chat.completion.chunk", "model": body["model"], "choices": [],
                         "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}})
        await event("[DONE]")
        await response.write_eof()
        return response

    return reply


def fail(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    async def reply(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        error = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
        return web.json_response(error, status=status, headers=headers)

    return reply


def slow(seconds: float) -> Reply:
    async def reply(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await answer("too late")(request, body)

    return reply


@pytest_asyncio.fixture
async def server() -> AsyncIterator[FakeServer]:
    fake = FakeServer(url="", replies=[answer("hello")])
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    yield fake
    await runner.cleanup()


@dataclass
class Rig:
    broker: ModelBroker
    provider: OpenAIProvider
    exporter: InMemorySpanExporter
    sleeps: list[float]

    async def call(
        self, prompt: str = "Say hello", *, stream: bool = False, deadline: float | None = None,
        params: dict[str, Any] | None = None,
    ) -> tuple[ModelAnswer, list[str]]:
        chunks: list[str] = []

        async def on_chunk(text: str) -> None:
            chunks.append(text)

        call = ModelRequest(call_id="c1", prompt=prompt, system="Be brief.", stream=stream)
        result = await self.broker.call(
            "openai", "gpt-test", params or {}, call, {"gen_ai.agent.name": "greeter"},
            deadline=deadline, on_chunk=on_chunk,
        )
        return result, chunks

    def span(self) -> ReadableSpan:
        (span,) = self.exporter.get_finished_spans()
        return span


@pytest_asyncio.fixture
async def rig(server: FakeServer) -> AsyncIterator[Rig]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(min(seconds, 0.01))  # the rig records waits rather than serving them

    provider = OpenAIProvider(server.url, API_KEY, backoff_s=0.01, max_backoff_s=0.05, sleep=sleep)
    broker = ModelBroker({"openai": provider}, tracer=tracer_provider.get_tracer("test"))
    yield Rig(broker, provider, exporter, sleeps)
    await broker.aclose()


async def test_a_plain_call_returns_the_text_and_usage(server: FakeServer, rig: Rig) -> None:
    result, chunks = await rig.call()

    assert (result.call_id, result.text, result.error) == ("c1", "hello", "")
    assert (result.input_tokens, result.output_tokens) == (7, 3)
    assert chunks == []
    body = server.bodies[0]
    assert body["model"] == "gpt-test"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}
    ]
    assert body["stream"] is False and "stream_options" not in body
    assert server.headers[0]["Authorization"] == f"Bearer {API_KEY}"


async def test_the_manifest_params_are_passed_through(server: FakeServer, rig: Rig) -> None:
    params = {"temperature": 0.2, "max_tokens": 64, "top_p": 0.9, "stop": ["\n\n"], "seed": 7,
              "model": "not-this-one"}

    await rig.call(params=params)

    body = server.bodies[0]
    assert {k: body[k] for k in ("temperature", "max_tokens", "top_p", "stop", "seed")} == {
        "temperature": 0.2, "max_tokens": 64, "top_p": 0.9, "stop": ["\n\n"], "seed": 7
    }
    assert body["model"] == "gpt-test"  # the manifest's [model] id, not a param


async def test_a_streamed_call_passes_each_delta_then_the_whole_text(
    server: FakeServer, rig: Rig
) -> None:
    server.replies = [stream(["Hel", "lo, ", "wor", "ld."])]

    result, chunks = await rig.call(stream=True)

    assert chunks == ["Hel", "lo, ", "wor", "ld."]
    assert (result.text, result.error) == ("Hello, world.", "")
    assert (result.input_tokens, result.output_tokens) == (7, 4)
    assert server.bodies[0]["stream"] is True
    assert server.bodies[0]["stream_options"] == {"include_usage": True}
    assert rig.span().attributes["gen_ai.usage.output_tokens"] == 4


async def test_a_stream_without_usage_still_answers(server: FakeServer, rig: Rig) -> None:
    server.replies = [stream(["a", "b"], usage=None)]

    result, chunks = await rig.call(stream=True)

    assert (result.text, chunks) == ("ab", ["a", "b"])
    assert (result.input_tokens, result.output_tokens) == (0, 0)
    attributes = rig.span().attributes or {}
    assert "gen_ai.usage.input_tokens" not in attributes
    assert attributes["gen_ai.response.model"] == "gpt-test-0613"


async def test_a_transient_503_is_retried_and_counted(server: FakeServer, rig: Rig) -> None:
    server.replies = [fail(503, "overloaded"), answer("second time lucky")]

    result, _ = await rig.call()

    assert (result.text, result.error) == ("second time lucky", "")
    assert server.hits == 2
    retries = [e for e in rig.span().events if e.name == "gen_ai.retry"]
    assert [(e.attributes or {})["error.type"] for e in retries] == ["503"]
    assert rig.span().status.status_code != StatusCode.ERROR


async def test_a_streamed_call_is_retried_before_its_first_chunk(
    server: FakeServer, rig: Rig
) -> None:
    server.replies = [fail(502, "bad gateway"), stream(["ok"])]

    result, chunks = await rig.call(stream=True)

    assert (result.text, chunks, server.hits) == ("ok", ["ok"], 2)


async def test_a_stream_that_breaks_after_a_chunk_is_not_retried(
    server: FakeServer, rig: Rig
) -> None:
    server.replies = [stream(["partial ", "rest"], then="drop"), stream(["other answer"])]

    result, chunks = await rig.call(stream=True)

    assert chunks == ["partial "]
    assert server.hits == 1
    assert result.error.startswith("openai model call failed: connection to 127.0.0.1:")
    assert result.text == ""


async def test_a_400_is_not_retried_and_says_what_the_server_said(
    server: FakeServer, rig: Rig
) -> None:
    server.replies = [fail(400, "'temperature' must be at most 2")]

    result, _ = await rig.call(params={"temperature": 9})

    assert server.hits == 1
    assert "openai" in result.error
    assert "HTTP 400" in result.error
    assert "'temperature' must be at most 2" in result.error
    span = rig.span()
    assert span.status.status_code == StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "400"


async def test_a_429_waits_as_long_as_retry_after_says(server: FakeServer, rig: Rig) -> None:
    server.replies = [fail(429, "slow down", {"Retry-After": "2"}), answer("ok")]

    result, _ = await rig.call(deadline=time.monotonic() + 20)

    assert (result.text, server.hits) == ("ok", 2)
    assert rig.sleeps == [2.0]


async def test_a_retry_after_past_the_deadline_is_not_waited_for(
    server: FakeServer, rig: Rig
) -> None:
    server.replies = [fail(429, "slow down", {"Retry-After": "30"}), answer("ok")]

    result, _ = await rig.call(deadline=time.monotonic() + 5)

    assert server.hits == 1 and rig.sleeps == []
    assert "HTTP 429" in result.error and "slow down" in result.error
    assert "no time left to retry after 30s within the deadline" in result.error


async def test_the_deadline_stops_retries(server: FakeServer) -> None:
    server.replies = [fail(503, "overloaded")]
    # Real waits this time: 0.2s apart, against a deadline 0.5s away.
    provider = OpenAIProvider(server.url, API_KEY, backoff_s=0.2, max_backoff_s=0.2,
                              max_attempts=100)
    started = time.monotonic()
    deadline = started + 0.5
    try:
        with pytest.raises(Exception, match="HTTP 503") as caught:
            await provider.complete("gpt-test", {}, "hi", "", deadline=deadline)
    finally:
        await provider.aclose()

    assert 2 <= server.hits < 100
    assert time.monotonic() < deadline + 0.2  # no attempt or wait went past it
    assert "within the deadline" in str(caught.value)


async def test_a_slow_server_is_cut_off_at_the_deadline(server: FakeServer, rig: Rig) -> None:
    server.replies = [slow(10)]
    deadline = time.monotonic() + 0.3

    result, _ = await rig.call(deadline=deadline)

    assert time.monotonic() < deadline + 1
    assert "no answer within" in result.error
    assert (rig.span().attributes or {})["error.type"] == "timeout"


async def test_the_api_key_never_appears_in_errors(server: FakeServer, rig: Rig) -> None:
    server.replies = [fail(401, f"Incorrect API key provided: {API_KEY}")]

    result, _ = await rig.call()

    assert "HTTP 401" in result.error and "Incorrect API key provided" in result.error
    assert API_KEY not in result.error
    span = rig.span()
    assert API_KEY not in (span.status.description or "")
    assert server.hits == 1


async def test_an_unreachable_server_is_retried_then_reported(rig: Rig) -> None:
    closed = OpenAIProvider(f"http://{refused_address()}/v1", API_KEY, backoff_s=0.01,
                            max_attempts=3)
    try:
        with pytest.raises(Exception, match="connection to 127.0.0.1") as caught:
            await closed.complete("gpt-test", {}, "hi", "")
    finally:
        await closed.aclose()

    assert "gave up after 3 attempts" in str(caught.value)
    assert API_KEY not in str(caught.value)


async def test_the_chat_span_has_the_genai_attributes(server: FakeServer, rig: Rig) -> None:
    await rig.call()

    span = rig.span()
    assert span.name == "chat gpt-test"
    assert dict(span.attributes or {}) == {
        "gen_ai.agent.name": "greeter",
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-test",
        "gen_ai.response.model": "gpt-test-0613",
        "gen_ai.usage.input_tokens": 7,
        "gen_ai.usage.output_tokens": 3,
    }
