"""What a model provider is (the contract the broker calls), and the scripted one: deterministic
answers for tests and demos."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from services.executor.model import ChunkSink


@dataclass(frozen=True)
class Completion:
    text: str
    # None when the server did not report usage (some OpenAI-compatible servers never do).
    input_tokens: int | None = None
    output_tokens: int | None = None
    # The model that answered, as the server names it ("" if unknown).
    response_model: str = ""


class ProviderError(Exception):
    """A model call failed. The message names the provider and never holds a credential;
    `error_type` is low-cardinality, for the span's error.type."""

    def __init__(
        self, provider: str, detail: str, *, error_type: str, transient: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{provider} model call failed: {detail}")
        self.provider = provider
        self.detail = detail
        self.error_type = error_type
        self.transient = transient
        self.retry_after = retry_after


class ModelProvider(Protocol):
    name: str

    async def complete(
        self, model_id: str, params: Mapping[str, Any], prompt: str, system: str, *,
        deadline: float | None = None,
    ) -> Completion: ...

    async def stream(
        self, model_id: str, params: Mapping[str, Any], prompt: str, system: str,
        on_chunk: ChunkSink, *, deadline: float | None = None,
    ) -> Completion:
        """Passes each text delta to `on_chunk`; the Completion holds the whole text."""
        ...

    async def aclose(self) -> None:
        """Releases what the provider holds open (connection pools)."""
        ...


class ScriptedProvider:
    """Deterministic answers computed from the prompt, for tests and the demo: the same prompt
    always gets the same text, and token counts are word counts."""

    name = "scripted"

    async def aclose(self) -> None:
        """Holds nothing open."""

    async def complete(
        self, model_id: str, params: Mapping[str, Any], prompt: str, system: str, *,
        deadline: float | None = None,
    ) -> Completion:
        words = prompt.split()
        keys: list[str] = []
        for w in words:
            w = w.strip(".,;:!?\"'()").lower()
            if len(w) > 4 and w not in keys:
                keys.append(w)
        text = f"[{model_id}] {len(words)} words; key points: {', '.join(keys[:5]) or 'none'}."
        return Completion(
            text=text, input_tokens=len(words) + len(system.split()),
            output_tokens=len(text.split()), response_model=model_id,
        )

    async def stream(
        self, model_id: str, params: Mapping[str, Any], prompt: str, system: str,
        on_chunk: ChunkSink, *, deadline: float | None = None,
    ) -> Completion:
        completion = await self.complete(model_id, params, prompt, system)
        for chunk in scripted_chunks(completion.text):
            await on_chunk(chunk)
        return completion


def scripted_chunks(text: str, words_per_chunk: int = 3) -> list[str]:
    """A few word-aligned pieces whose concatenation is exactly `text`."""
    words = re.findall(r"\s*\S+\s*", text) or [text]
    return ["".join(words[i:i + words_per_chunk]) for i in range(0, len(words), words_per_chunk)]

