"""The model broker without sockets: the scripted provider's stream, configuration from the
environment, provider errors, and the openai provider over httpx's MockTransport."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from services.common.settings import SettingsError
from services.executor.broker import ModelBroker, providers_from_settings
from services.executor.model import ModelAnswer, ModelRequest
from services.executor.openai_provider import OpenAIProvider
from services.executor.providers import Completion, ProviderError, ScriptedProvider

pytestmark = pytest.mark.timeout(10)

PROMPT = "Summarise the quarterly report about revenue, churn and hiring plans."


def model_call(stream: bool = False) -> ModelRequest:
    return ModelRequest(call_id="c1", prompt=PROMPT, system="Be brief.", stream=stream)


async def call(
    broker: ModelBroker, provider: str = "scripted", *, stream: bool = False,
    deadline: float | None = None,
) -> tuple[ModelAnswer, list[str]]:
    chunks: list[str] = []

    async def on_chunk(text: str) -> None:
        chunks.append(text)

    result = await broker.call(
        provider, "m-1", {}, model_call(stream), {}, deadline=deadline, on_chunk=on_chunk
    )
    return result, chunks


async def test_the_scripted_stream_is_a_few_chunks_of_the_same_answer() -> None:
    broker = ModelBroker({"scripted": ScriptedProvider()})
    plain, no_chunks = await call(broker)
    streamed, chunks = await call(broker, stream=True)

    assert no_chunks == []
    assert len(chunks) > 1
    assert "".join(chunks) == streamed.text == plain.text
    assert streamed.input_tokens == plain.input_tokens
    assert streamed.output_tokens == plain.output_tokens


async def test_the_existing_call_form_still_works() -> None:
    broker = ModelBroker({"scripted": ScriptedProvider()})
    result = await broker.call("scripted", "m-1", {}, model_call(stream=True), {}, None)
    assert result.text.startswith("[m-1]") and result.error == ""


async def test_openai_is_absent_until_its_base_url_is_set() -> None:
    providers = providers_from_settings({"CORRAL_OPENAI_API_KEY": "sk-x"})
    assert set(providers) == {"scripted"}

    result, _ = await call(ModelBroker(providers), "openai")

    assert result.error == (
        "model provider 'openai' is not configured: set CORRAL_OPENAI_BASE_URL"
    )


async def test_openai_is_configured_from_the_environment() -> None:
    providers = providers_from_settings({"CORRAL_OPENAI_BASE_URL": "http://vllm:8000/v1/"})
    try:
        openai = providers["openai"]
        assert isinstance(openai, OpenAIProvider)
        assert openai.url == "http://vllm:8000/v1/chat/completions"
    finally:
        await ModelBroker(providers).aclose()


def test_a_base_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(SettingsError, match="CORRAL_OPENAI_BASE_URL"):
        providers_from_settings({"CORRAL_OPENAI_BASE_URL": "localhost:11434"})


async def test_a_passed_deadline_fails_without_calling_the_provider() -> None:
    broker = ModelBroker({"scripted": ScriptedProvider()})
    result, _ = await call(broker, deadline=time.monotonic())
    assert "deadline passed" in result.error


class BrokenSinkProvider:
    name = "broken"

    async def complete(self, *args: Any, **kwargs: Any) -> Completion:
        raise AssertionError("not called")

    async def stream(
        self, model_id: str, params: Mapping[str, Any], prompt: str, system: str, on_chunk: Any,
        *, deadline: float | None = None,
    ) -> Completion:
        await on_chunk("part")
        return Completion("part")


async def test_a_failing_on_chunk_propagates_rather_than_becoming_a_model_error() -> None:
    async def closed_socket(text: str) -> None:
        raise ConnectionResetError("the sandbox went away")

    broker = ModelBroker({"broken": BrokenSinkProvider()})
    with pytest.raises(ConnectionResetError):
        await broker.call(
            "broken", "m-1", {}, model_call(stream=True), {}, on_chunk=closed_socket
        )


def mock_provider(*responses: httpx.Response, sleeps: list[float] | None = None) -> tuple[
    OpenAIProvider, list[httpx.Request]
]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return responses[min(len(seen), len(responses)) - 1]

    async def sleep(seconds: float) -> None:
        (sleeps if sleeps is not None else []).append(seconds)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return OpenAIProvider("http://llm/v1", None, client=client, sleep=sleep), seen


def ok(text: str = "fine") -> httpx.Response:
    return httpx.Response(200, json={"model": "m", "choices": [{"message": {"content": text}}]})


async def test_no_api_key_sends_no_authorization_header() -> None:
    provider, seen = mock_provider(ok())
    completion = await provider.complete("m", {}, "hi", "")
    assert completion == Completion("fine", None, None, "m")
    assert "authorization" not in seen[0].headers
    assert json.loads(seen[0].content)["messages"] == [{"role": "user", "content": "hi"}]


async def test_retry_after_as_an_http_date_is_honoured() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=5), usegmt=True)
    sleeps: list[float] = []
    provider, seen = mock_provider(
        httpx.Response(503, headers={"Retry-After": when}, text="busy"), ok(), sleeps=sleeps
    )

    assert (await provider.complete("m", {}, "hi", "")).text == "fine"
    assert len(seen) == 2 and len(sleeps) == 1 and 3 < sleeps[0] <= 5


async def test_a_retry_after_beyond_the_cap_is_not_waited_for() -> None:
    sleeps: list[float] = []
    provider, seen = mock_provider(
        httpx.Response(429, headers={"Retry-After": "3600"}, json={"error": "quota"}),
        sleeps=sleeps,
    )
    with pytest.raises(ProviderError, match=r"HTTP 429 .*quota.*retry after 3600s") as caught:
        await provider.complete("m", {}, "hi", "")
    assert (len(seen), sleeps, caught.value.error_type) == (1, [], "429")


@pytest.mark.parametrize("body", [
    {"error": {"message": "no such model"}},          # OpenAI, LiteLLM
    {"object": "error", "message": "no such model"},  # older vLLM
    {"error": "no such model"},                       # Ollama
    {"detail": "no such model"},                      # FastAPI-based servers
])
async def test_the_server_message_is_found_in_each_error_shape(body: dict[str, Any]) -> None:
    provider, _ = mock_provider(httpx.Response(404, json=body))
    with pytest.raises(ProviderError, match="HTTP 404 Not Found from llm: no such model$"):
        await provider.complete("m", {}, "hi", "")


async def test_a_server_that_ignores_stream_is_passed_on_as_one_chunk() -> None:
    provider, _ = mock_provider(ok("all at once"))
    chunks: list[str] = []

    async def on_chunk(text: str) -> None:
        chunks.append(text)

    completion = await provider.stream("m", {}, "hi", "", on_chunk)
    assert (completion.text, chunks) == ("all at once", ["all at once"])


async def test_an_error_event_in_the_stream_is_reported() -> None:
    events = (
        'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
        'data: {"error":{"message":"the model crashed"}}\n\n'
    )
    provider, _ = mock_provider(
        httpx.Response(200, headers={"content-type": "text/event-stream"}, text=events)
    )
    chunks: list[str] = []

    async def on_chunk(text: str) -> None:
        chunks.append(text)

    with pytest.raises(ProviderError, match="error in the stream: the model crashed"):
        await provider.stream("m", {}, "hi", "", on_chunk)
    assert chunks == ["Hi"]
