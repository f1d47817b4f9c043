"""The model broker: the sandbox's model calls arrive here and go to the provider the version's
manifest pins. Each call is a span with the OpenTelemetry GenAI attributes."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context

from services.common.outbound import OutboundPolicy, OutboundRefused, Unresolved
from services.common.prometheus import OK, Series
from services.common.settings import SettingsError
from services.executor.metrics import ExecutorMetrics
from services.executor.model import ChunkSink, ModelAnswer, ModelRequest, SpanAttributes
from services.executor.openai_provider import OpenAIProvider
from services.executor.providers import (
    Completion,
    ModelProvider,
    ProviderError,
    ScriptedProvider,
)

log = logging.getLogger(__name__)

# What the broker tells the agent when a manifest names a provider this executor lacks.
_CONFIGURE_HINTS = {"openai": "set CORRAL_OPENAI_BASE_URL"}


def providers_from_settings(
    env: Mapping[str, str], outbound: OutboundPolicy | None = None
) -> dict[str, ModelProvider]:
    """The scripted provider always; the openai one when CORRAL_OPENAI_BASE_URL names a server.
    There is deliberately no default URL: a manifest pinning `openai` on an executor without one
    should fail loudly, not reach whatever listens on a local port. With `outbound`, each model
    call is checked against the policy (check_provider_urls checks the URL once at start)."""
    providers: dict[str, ModelProvider] = {"scripted": ScriptedProvider()}
    base_url = env.get("CORRAL_OPENAI_BASE_URL", "").strip()
    if base_url:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(
                f"CORRAL_OPENAI_BASE_URL={base_url!r} is not an http(s) URL "
                "(for example http://127.0.0.1:8000/v1)"
            )
        providers["openai"] = OpenAIProvider(
            base_url, env.get("CORRAL_OPENAI_API_KEY") or None, outbound=outbound
        )
    return providers


async def check_provider_urls(env: Mapping[str, str], outbound: OutboundPolicy) -> None:
    """Refuses to start with a model provider the outbound policy forbids (a clear SettingsError
    naming the variable); a name that does not resolve yet is only logged (calls fail closed)."""
    base_url = env.get("CORRAL_OPENAI_BASE_URL", "").strip()
    if not base_url:
        return
    try:
        await outbound.check_url(base_url)
    except Unresolved as exc:
        log.warning("CORRAL_OPENAI_BASE_URL=%r: %s; model calls fail until it resolves", base_url, exc)
    except OutboundRefused as exc:
        raise SettingsError(
            f"CORRAL_OPENAI_BASE_URL={base_url!r}: {exc} (for a model server on this machine or "
            "a private network, list its network in CORRAL_OUTBOUND_ALLOW, e.g. 127.0.0.0/8)"
        ) from None


class ProviderNotConfigured(Exception):
    """The manifest pins a provider this executor has no configuration for."""

    error_type = "provider_not_configured"

    def __init__(self, provider: str, configured: list[str]) -> None:
        hint = _CONFIGURE_HINTS.get(provider, f"configured providers: {', '.join(configured)}")
        super().__init__(f"model provider {provider!r} is not configured: {hint}")


class _SinkFailed(Exception):
    """The caller's on_chunk raised: the caller's failure (say, a closed sandbox socket), not the
    model's, so it is re-raised rather than reported as a model error."""


class ModelBroker:
    def __init__(
        self, providers: Mapping[str, ModelProvider], *, tracer: trace.Tracer | None = None,
        metrics: ExecutorMetrics | None = None,
    ) -> None:
        self.providers = dict(providers)
        self._tracer = tracer or trace.get_tracer(__name__)
        # Where calls, tokens and their cost are counted (none: not counted).
        self._metrics = metrics

    async def aclose(self) -> None:
        """Closes the providers' connection pools."""
        for impl in self.providers.values():
            await impl.aclose()

    async def call(
        self, provider: str, model_id: str, params: Mapping[str, Any], call: ModelRequest,
        attributes: SpanAttributes, context: Context | None = None, *,
        deadline: float | None = None, on_chunk: ChunkSink | None = None,
        series: Series | None = None,
    ) -> ModelAnswer:
        """Calls the model; with call.stream and on_chunk, each text delta goes to on_chunk first.
        `deadline` is an absolute time.monotonic() value. Model failures come back as
        ModelAnswer.error; an exception from on_chunk propagates. The call and its tokens are
        counted under `series`."""
        with self._tracer.start_as_current_span(
            f"chat {model_id}", context=context, attributes=dict(attributes)
        ) as span:
            span.set_attribute("gen_ai.operation.name", "chat")
            span.set_attribute("gen_ai.provider.name", provider)
            span.set_attribute("gen_ai.request.model", model_id)
            try:
                result = await self._complete(provider, model_id, params, call, deadline, on_chunk)
            except _SinkFailed as exc:
                assert exc.__cause__ is not None
                raise exc.__cause__ from None
            except Exception as exc:  # noqa: BLE001 - reported to the agent as a model error
                log.warning("model call to %s/%s failed: %s", provider, model_id, exc)
                if isinstance(exc, ProviderError | ProviderNotConfigured):
                    error_type, message = exc.error_type, str(exc)
                else:
                    error_type, message = type(exc).__qualname__, f"{provider} model call failed: {exc}"
                span.set_attribute("error.type", error_type)
                span.set_status(trace.StatusCode.ERROR, str(exc))
                self._count(series, model_id, error_type)
                return ModelAnswer(call_id=call.call_id, error=message)
            span.set_attribute("gen_ai.response.model", result.response_model or model_id)
            if result.input_tokens is not None:
                span.set_attribute("gen_ai.usage.input_tokens", result.input_tokens)
            if result.output_tokens is not None:
                span.set_attribute("gen_ai.usage.output_tokens", result.output_tokens)
            answer = ModelAnswer(
                call_id=call.call_id, text=result.text,
                input_tokens=result.input_tokens or 0, output_tokens=result.output_tokens or 0,
            )
            self._count(series, model_id, OK, answer.input_tokens, answer.output_tokens)
            return answer

    def _count(
        self, series: Series | None, model_id: str, code: str, input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> None:
        if self._metrics is not None and series is not None:
            self._metrics.model_call(series, model_id, code, input_tokens, output_tokens)

    async def _complete(
        self, provider: str, model_id: str, params: Mapping[str, Any], call: ModelRequest,
        deadline: float | None, on_chunk: ChunkSink | None,
    ) -> Completion:
        impl = self.providers.get(provider)
        if impl is None:
            raise ProviderNotConfigured(provider, sorted(self.providers))
        if deadline is not None and time.monotonic() >= deadline:
            raise ProviderError(provider, "the call's deadline passed", error_type="timeout")
        if not (call.stream and on_chunk is not None):
            return await impl.complete(
                model_id, params, call.prompt, call.system, deadline=deadline
            )
        sink = on_chunk

        async def guarded(text: str) -> None:
            try:
                await sink(text)
            except Exception as exc:
                raise _SinkFailed() from exc

        return await impl.stream(
            model_id, params, call.prompt, call.system, guarded, deadline=deadline
        )
