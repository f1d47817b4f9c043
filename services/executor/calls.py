"""The agent's calls out of its sandbox during one invocation: model calls go to the provider its
manifest pins, tool calls to the tenant's tools, each as a child span of the invocation and
within its deadline."""

from __future__ import annotations

import time
from dataclasses import dataclass

from opentelemetry.context import Context as OtelContext

from corral.manifest import Manifest
from services.common.identity import Caller
from services.common.prometheus import Series
from services.executor.broker import ModelBroker
from services.executor.model import (
    UNAVAILABLE,
    CallTokens,
    ChunkSink,
    ModelAnswer,
    ModelRequest,
    SpanAttributes,
    ToolOutcome,
    ToolRequest,
)
from services.executor.tools import ToolBroker


@dataclass(frozen=True)
class InvocationScope:
    """What every call an invocation makes carries along."""

    caller: Caller
    manifest: Manifest
    # Mints each tool call's token (None when its version declares no tools).
    tokens: CallTokens | None
    attributes: SpanAttributes
    context: OtelContext
    # Unix seconds (time.time()).
    deadline: float
    # The version the calls are counted under (metrics.py).
    series: Series


class AgentCalls:
    """Answers one invocation's model and tool calls."""

    def __init__(self, models: ModelBroker, tools: ToolBroker | None, scope: InvocationScope) -> None:
        self._models = models
        self._tools = tools
        self._scope = scope

    async def model(self, request: ModelRequest, on_chunk: ChunkSink | None) -> ModelAnswer:
        scope, manifest = self._scope, self._scope.manifest
        return await self._models.call(
            manifest.model_provider, manifest.model_id, manifest.model_params, request,
            scope.attributes, scope.context,
            deadline=time.monotonic() + (scope.deadline - time.time()), on_chunk=on_chunk,
            series=scope.series,
        )

    async def tool(self, request: ToolRequest) -> ToolOutcome:
        if self._tools is None:
            return ToolOutcome(error="this executor has no tool broker", error_code=UNAVAILABLE)
        scope = self._scope
        return await self._tools.call(
            tenant=scope.caller.tenant, tool=request.tool,
            allowed=[t.name for t in scope.manifest.tools], tokens=scope.tokens,
            payload=request.payload, content_type=request.content_type,
            timeout_s=request.timeout_s or None, deadline=scope.deadline,
            attributes=scope.attributes, context=scope.context, series=scope.series,
        )
