"""The `openai` provider: any OpenAI-compatible server (vLLM, Ollama, LiteLLM, OpenAI) over httpx,
streaming or not, with retries on transient failures only and the caller's deadline respected."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from opentelemetry import trace
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from services.common.outbound import OutboundPolicy, OutboundRefused, Unresolved
from services.common.outbound_http import pinned_client
from services.executor.model import ChunkSink
from services.executor.providers import Completion, ProviderError

log = logging.getLogger(__name__)

# Statuses an OpenAI-compatible server uses for "try again": overload, rate limits, restarts.
TRANSIENT_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class OpenAIProvider:
    """Any OpenAI-compatible server (OpenAI, vLLM, Ollama, LiteLLM) through POST
    {base_url}/chat/completions. Transient failures are retried within the caller's deadline."""

    name = "openai"

    def __init__(
        self, base_url: str, api_key: str | None, *, client: httpx.AsyncClient | None = None,
        timeout_s: float = 120.0, max_attempts: int = 4, backoff_s: float = 0.5,
        max_backoff_s: float = 8.0, max_retry_after_s: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        outbound: OutboundPolicy | None = None,
    ) -> None:
        # `client` lets a caller share a pool or a test mock the transport; `sleep` lets a test
        # record the waits between attempts instead of serving them. With `outbound`, every call
        # is checked against the policy and dials the address it checked.
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key or ""
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_client = client is None
        self._client = client or (
            pinned_client(outbound) if outbound is not None else httpx.AsyncClient()
        )
        # Used only when the caller gives no deadline.
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.max_retry_after_s = max_retry_after_s
        self._backoff = wait_exponential_jitter(
            multiplier=backoff_s, max=max_backoff_s, jitter=backoff_s
        )
        self._sleep = sleep

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def complete(
        self, model_id: str, params: Mapping[str, Any], prompt: str, system: str, *,
        deadline: float | None = None,
    ) -> Completion:
        body = request_body(model_id, params, prompt, system, stream=False)
        return await self._with_retries(
            lambda timeout: self._post(body, timeout), deadline, forwarded=lambda: False
        )

    async def stream(
        self, model_id: str, params: Mapping[str, Any], prompt: str, system: str,
        on_chunk: ChunkSink, *, deadline: float | None = None,
    ) -> Completion:
        body = request_body(model_id, params, prompt, system, stream=True)
        sent = False

        async def forward(text: str) -> None:
            nonlocal sent
            sent = True
            await on_chunk(text)

        # Once the agent has seen part of an answer, a retry would show it a second, different one.
        return await self._with_retries(
            lambda timeout: self._stream(body, timeout, forward), deadline, forwarded=lambda: sent
        )

    async def _with_retries(
        self, attempt: Callable[[float], Awaitable[Completion]], deadline: float | None,
        forwarded: Callable[[], bool],
    ) -> Completion:
        gave_up = ""

        def should_stop(state: RetryCallState) -> bool:
            nonlocal gave_up
            exc = state.outcome.exception() if state.outcome else None
            asked = exc.retry_after if isinstance(exc, ProviderError) else None
            tries = f"{state.attempt_number} attempt" + ("s" if state.attempt_number > 1 else "")
            if state.attempt_number >= self.max_attempts:
                gave_up = f"gave up after {tries}"
            elif asked is not None and asked > self.max_retry_after_s:
                gave_up = f"the server asked to retry after {asked:g}s; gave up after {tries}"
            elif deadline is not None and time.monotonic() + state.upcoming_sleep >= deadline:
                wait = f"retry after {asked:g}s" if asked is not None else "retry"
                gave_up = f"no time left to {wait} within the deadline; gave up after {tries}"
            return bool(gave_up)

        retrying = AsyncRetrying(
            retry=retry_if_exception(
                lambda exc: isinstance(exc, ProviderError) and exc.transient and not forwarded()
            ),
            wait=self._wait, stop=should_stop, sleep=self._sleep, before_sleep=self._note_retry,
            reraise=True,
        )
        try:
            completion: Completion = await retrying(self._attempt, attempt, deadline)
        except ProviderError as exc:
            if gave_up:
                raise ProviderError(
                    self.name, f"{exc.detail} ({gave_up})", error_type=exc.error_type
                ) from None
            raise
        return completion

    async def _attempt(
        self, attempt: Callable[[float], Awaitable[Completion]], deadline: float | None
    ) -> Completion:
        if deadline is None:
            timeout = self.timeout_s
        else:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise ProviderError(self.name, "the call's deadline passed", error_type="timeout")
        try:
            # httpx's timeout is per read; the outer one caps a stream that trickles forever.
            async with asyncio.timeout(timeout if deadline is not None else None):
                return await attempt(timeout)
        except (TimeoutError, httpx.TimeoutException):
            raise ProviderError(
                self.name, f"no answer within {timeout:.1f}s", error_type="timeout", transient=True
            ) from None
        except OutboundRefused as exc:
            raise ProviderError(
                self.name, f"{self._where()} is not reachable: {exc}",
                error_type="destination_refused", transient=isinstance(exc, Unresolved),
            ) from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            reason = self._redact(str(exc)) or type(exc).__name__
            raise ProviderError(
                self.name, f"connection to {self._where()} failed: {reason}",
                error_type=f"httpx.{type(exc).__name__}", transient=True,
            ) from None
        except httpx.HTTPError as exc:
            raise ProviderError(
                self.name, f"request to {self._where()} failed: {self._redact(str(exc))}",
                error_type=f"httpx.{type(exc).__name__}",
            ) from None

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ProviderError) and exc.retry_after is not None:
            return exc.retry_after
        return float(self._backoff(state))

    def _note_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.upcoming_sleep
        log.warning("%s (attempt %d); retrying in %.2fs", exc, state.attempt_number, wait)
        trace.get_current_span().add_event("gen_ai.retry", {
            "attempt": state.attempt_number, "wait_s": wait,
            "error.type": exc.error_type if isinstance(exc, ProviderError) else type(exc).__name__,
        })

    async def _post(self, body: Mapping[str, Any], timeout: float) -> Completion:
        response = await self._client.post(
            self.url, json=body, headers=self._headers, timeout=timeout
        )
        if not response.is_success:
            raise self._http_error(response)
        return self._parse_completion(response.text)

    async def _stream(
        self, body: Mapping[str, Any], timeout: float, forward: ChunkSink
    ) -> Completion:
        async with self._client.stream(
            "POST", self.url, json=body, headers=self._headers, timeout=timeout
        ) as response:
            if not response.is_success:
                await response.aread()
                raise self._http_error(response)
            if response.headers.get("content-type", "").startswith("application/json"):
                # A server that ignores `stream` answers in one piece; pass it on as one chunk.
                completion = self._parse_completion((await response.aread()).decode())
                if completion.text:
                    await forward(completion.text)
                return completion
            return await self._read_events(response, forward)

    async def _read_events(self, response: httpx.Response, forward: ChunkSink) -> Completion:
        parts: list[str] = []
        usage: Mapping[str, Any] = {}
        model = ""
        async for data in sse_data(response.aiter_lines()):
            if data.strip() == "[DONE]":
                break
            event = self._json(data)
            if "error" in event:
                raise ProviderError(
                    self.name, f"error in the stream: {self._redact(server_message(data))}",
                    error_type="stream_error",
                )
            model = event.get("model") or model
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                # n > 1 is not supported: the agent gets the first choice, as in a plain call.
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                text = (choice.get("delta") or {}).get("content")
                if text:
                    parts.append(text)
                    await forward(text)
        return Completion(
            "".join(parts), usage.get("prompt_tokens"), usage.get("completion_tokens"), model
        )

    def _parse_completion(self, text: str) -> Completion:
        payload = self._json(text)
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ProviderError(
                self.name, "the answer has no choices", error_type="invalid_response"
            )
        message = choices[0].get("message") or {}
        usage = payload.get("usage") or {}
        return Completion(
            message.get("content") or "", usage.get("prompt_tokens"),
            usage.get("completion_tokens"), payload.get("model") or "",
        )

    def _json(self, text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise ProviderError(
                self.name,
                f"the server's answer is not a JSON object: {self._redact(text[:200])!r}",
                error_type="invalid_response",
            )
        return value

    def _http_error(self, response: httpx.Response) -> ProviderError:
        status = response.status_code
        return ProviderError(
            self.name,
            f"HTTP {status} {response.reason_phrase} from {self._where()}: "
            f"{self._redact(server_message(response.text))}",
            error_type=str(status), transient=status in TRANSIENT_STATUSES,
            retry_after=retry_after(response.headers),
        )

    def _where(self) -> str:
        # Host and port only: a base URL may carry user:password.
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "[redacted]") if self._api_key else text


def request_body(
    model_id: str, params: Mapping[str, Any], prompt: str, system: str, *, stream: bool
) -> dict[str, Any]:
    """The manifest's params pass through; the keys the broker owns are set last, so a manifest
    cannot override the model or the messages."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    body: dict[str, Any] = {**params, "model": model_id, "messages": messages, "stream": stream}
    if stream:
        # Without it OpenAI and vLLM send no usage when streaming.
        body["stream_options"] = {**(params.get("stream_options") or {}), "include_usage": True}
    else:
        body.pop("stream_options", None)  # OpenAI rejects it on a non-streaming call
    return body


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each server-sent event; a blank line ends an event, comments are skipped."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


def server_message(text: str) -> str:
    """The human part of an error body, in the shapes OpenAI, vLLM, Ollama and FastAPI use."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        for value in (error, body.get("message"), body.get("detail")):
            if isinstance(value, str) and value:
                return value
    return text.strip()[:500] or "(no message)"


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asked us to wait: retry-after-ms (OpenAI), or Retry-After as seconds or
    an HTTP date."""
    if "retry-after-ms" in headers:
        try:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())

