"""corral.sdk: what agent code imports. Tiny on purpose, and it imports nothing of the services.

    from corral.sdk import App

    app = App()

    @app.entrypoint
    async def handle(payload, ctx):
        ctx.state["turns"] = ctx.state.get("turns", 0) + 1
        yield ctx.model.complete(payload["text"])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

# What a span attribute may hold (OpenTelemetry takes these and more).
AttributeValue = (
    str | bool | int | float | Sequence[str] | Sequence[bool] | Sequence[int] | Sequence[float]
)


class Span(Protocol):
    """The part of an OpenTelemetry span that agent code uses."""

    def set_attribute(self, key: str, value: AttributeValue) -> None: ...

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None: ...

    def add_event(
        self, name: str, attributes: Mapping[str, AttributeValue] | None = None
    ) -> None: ...


class Tracer(Protocol):
    """ctx.tracer, an OpenTelemetry tracer: the spans agent code starts join the invocation's
    trace. Declared here rather than imported, so that this module needs nothing installed."""

    def start_as_current_span(
        self, name: str, *, attributes: Mapping[str, AttributeValue] | None = None
    ) -> AbstractContextManager[Span]: ...


class Model(Protocol):
    """The model pinned by the version's manifest, reached through the executor's broker."""

    def complete(self, prompt: str, *, system: str = "") -> str:
        """The whole answer."""
        ...

    def stream(self, prompt: str, *, system: str = "") -> Iterator[str]:
        """The answer as it is generated, piece by piece."""
        ...

    async def acomplete(self, prompt: str, *, system: str = "") -> str:
        """The whole answer, for async handlers."""
        ...


class ModelError(RuntimeError):
    """The broker could not get an answer from the model."""


class Tools(Protocol):
    """The tools the version's manifest declares ([[tools]]), called through the executor's
    broker, which adds the invocation's credential and the tool's secret."""

    def call(self, name: str, payload: Any = None, *, timeout_s: float | None = None) -> Any:
        """Calls tool `name` with `payload` (bytes are sent as they are, anything else as JSON)
        and returns its answer (parsed when it is JSON). Raises ToolError."""
        ...


class ToolError(RuntimeError):
    """A tool call failed. `code` says how: PERMISSION_DENIED (the manifest does not declare
    the tool), NOT_FOUND, TIMEOUT, UNAVAILABLE or TOOL_ERROR (the tool answered with an error)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class Context:
    """What a handler gets besides its payload. `state` is persisted by the platform after a
    successful invocation and handed back on the session's next turn."""

    session_id: str
    invocation_id: str
    version: str
    endpoint: str
    state: dict[str, Any]
    model: Model
    tracer: Tracer
    tenant: str = ""
    user: str = ""
    prompt: str = ""
    # This invocation's credential (a JWT that expires at its deadline and is revoked when it
    # ends; its audience is the version, so no tool accepts it). Tool calls through ctx.tools
    # need none: the executor gives each call a token of its own for that one tool.
    credentials: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    tools: Tools | None = None

    def score(self, name: str, value: float, *, comment: str = "") -> None:
        """Records a quality score in [0, 1] on this session (an OpenTelemetry
        gen_ai.evaluation.result event); it counts for the version like any other score."""
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"score {name!r}: {value} is outside [0, 1]")
        with self.tracer.start_as_current_span(f"evaluation {name}") as span:
            span.add_event(EVALUATION_EVENT, {
                "gen_ai.evaluation.name": name,
                "gen_ai.evaluation.score.value": float(value),
                "gen_ai.evaluation.explanation": comment,
            })


EVALUATION_EVENT = "gen_ai.evaluation.result"
# (payload, ctx) -> what streams back: the payload is the request's JSON, or its text when it is
# not JSON; the result is a value, or a generator, coroutine or async generator of values.
Handler = Callable[[Any, Context], object]
H = TypeVar("H", bound=Handler)


class App:
    """An agent application: register one handler with @app.entrypoint. The handler takes
    (payload, ctx) and may be a function, a coroutine, a generator or an async generator;
    what it returns or yields (str, bytes, or JSON-able values) streams back to the caller."""

    def __init__(self) -> None:
        self.handler: Handler | None = None

    def entrypoint(self, fn: H) -> H:
        self.handler = fn
        return fn


__all__ = ["App", "Context", "Model", "ModelError", "Span", "ToolError", "Tools", "Tracer"]
