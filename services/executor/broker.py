"""The model broker: the sandbox's model calls arrive here and go to the provider the version's
manifest pins. Each call is a span with the OpenTelemetry GenAI attributes."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.context import Context

from corral.sandbox.v1 import sandbox_pb2 as pb

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


@dataclass(frozen=True)
class Completion:
    text: str
    input_tokens: int
    output_tokens: int


class ModelProvider(Protocol):
    name: str

    async def complete(
        self, model_id: str, params: Mapping[str, Any], prompt: str, system: str
    ) -> Completion: ...


class ScriptedProvider:
    """Deterministic answers computed from the prompt, for tests and the demo: the same prompt
    always gets the same text, and token counts are word counts."""

    name = "scripted"

    async def complete(
        self, model_id: str, params: Mapping[str, Any], prompt: str, system: str
    ) -> Completion:
        words = prompt.split()
        keys: list[str] = []
        for w in words:
            w = w.strip(".,;:!?\"'()").lower()
            if len(w) > 4 and w not in keys:
                keys.append(w)
        text = f"[{model_id}] {len(words)} words; key points: {', '.join(keys[:5]) or 'none'}."
        return Completion(text=text, input_tokens=len(words) + len(system.split()), output_tokens=len(text.split()))


class ModelBroker:
    def __init__(self, providers: Mapping[str, ModelProvider]) -> None:
        self.providers = dict(providers)

    async def call(
        self, provider: str, model_id: str, params: Mapping[str, Any], call: pb.ModelCall,
        attributes: Mapping[str, Any], context: Context | None = None,
    ) -> pb.ModelResult:
        with tracer.start_as_current_span(f"chat {model_id}", context=context, attributes=dict(attributes)) as span:
            span.set_attribute("gen_ai.operation.name", "chat")
            span.set_attribute("gen_ai.provider.name", provider)
            span.set_attribute("gen_ai.request.model", model_id)
            impl = self.providers.get(provider)
            if impl is None:
                span.set_status(trace.StatusCode.ERROR, "unknown provider")
                return pb.ModelResult(call_id=call.call_id, error=f"model provider {provider!r} is not configured")
            try:
                result = await impl.complete(model_id, params, call.prompt, call.system)
            except Exception as exc:  # noqa: BLE001 - reported to the agent as a model error
                log.warning("model call to %s/%s failed: %s", provider, model_id, exc)
                span.set_status(trace.StatusCode.ERROR, str(exc))
                return pb.ModelResult(call_id=call.call_id, error=f"{provider} model call failed: {exc}")
            span.set_attribute("gen_ai.usage.input_tokens", result.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", result.output_tokens)
            return pb.ModelResult(
                call_id=call.call_id, text=result.text,
                input_tokens=result.input_tokens, output_tokens=result.output_tokens,
            )
