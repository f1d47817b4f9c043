"""The tool broker: a sandbox's tool calls go to the tenant's registered tools from here, with a
token minted for that one call and the tool's secret attached here, so the sandbox needs no
network and never sees a secret; both are blanked out of what the tool answers (redaction.py).
Each call is an `execute_tool {tool}` span (telemetry counts calls and failures)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import replace

from opentelemetry import trace
from opentelemetry.context import Context

from corral.names import ToolRef
from services.common.errors import CorralError
from services.common.prometheus import Series
from services.executor import redaction
from services.executor.metrics import ExecutorMetrics
from services.executor.model import (
    NOT_FOUND,
    PERMISSION_DENIED,
    TIMEOUT,
    UNAVAILABLE,
    CallTokens,
    Credential,
    Redactions,
    ResolvedTool,
    SpanAttributes,
    ToolCall,
    ToolFailure,
    ToolOutcome,
    ToolResolver,
    ToolSender,
)

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

# The attribute telemetry counts tool calls by (services/telemetry/store/sql.py, IS_TOOL_CALL).
TOOL_ATTR = "corral.tool.name"
# The span event of a tool that echoed a credential back, with what was found (never the value).
REDACTED_EVENT = "corral.tool.secret_redacted"
# How long a resolved tool (or the fact that it does not exist) is reused by default, so the
# registry is not asked on every call. A changed address, secret or timeout, or a deleted tool,
# is pushed to the executor by the endpoint watch (`forget`) and applies at the next call; this
# is the bound when that news is lost. The executor passes settings.credential_cache_s (5 s), the
# bound on every registry change it caches (a revoked API key is honoured as long).
DEFAULT_CACHE_TTL_S = 5.0
RESOLVE_TIMEOUT_S = 5.0


class ToolBroker:
    def __init__(
        self,
        *,
        resolver: ToolResolver,
        transport: ToolSender,
        tracer: trace.Tracer | None = None,
        clock: Callable[[], float] = time.time,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        metrics: ExecutorMetrics | None = None,
    ) -> None:
        self.resolver = resolver
        # Where calls are counted by outcome (none: not counted).
        self.metrics = metrics
        self.tracer = tracer or _tracer
        self.clock = clock
        self.cache_ttl_s = cache_ttl_s
        self._transport = transport
        # (tenant, tool) → (until when, per self.clock; the tool, or None for "not registered")
        self._cache: dict[tuple[str, str], tuple[float, ResolvedTool | None]] = {}

    async def close(self) -> None:
        await self._transport.close()
        await self.resolver.close()

    def forget(self, tools: Iterable[tuple[str, ToolRef]]) -> None:
        """Drops what is cached of these tools (changed or deleted): their next call resolves
        them again."""
        for tenant, tool in tools:
            self._cache.pop((tenant, tool.tool), None)

    def forget_all(self) -> None:
        self._cache.clear()

    async def call(
        self,
        *,
        tenant: str,
        tool: str,
        allowed: Collection[str],
        tokens: CallTokens | None,
        payload: bytes,
        content_type: str,
        timeout_s: float | None,
        deadline: float,
        attributes: SpanAttributes,
        context: Context | None,
        series: Series | None = None,
    ) -> ToolOutcome:
        """Calls `tool` of `tenant` if the version declares it (`allowed`: agent.toml's [[tools]]
        names), with a token from `tokens` for this call alone (none when None). `deadline` is
        the invocation's, in Unix seconds (time.time()); the call gets the least of the tool's
        timeout, `timeout_s` and the time left to it. The call is counted under `series`."""
        with self.tracer.start_as_current_span(
            f"execute_tool {tool}", context=context, kind=trace.SpanKind.CLIENT,
            attributes=dict(attributes),
        ) as span:
            span.set_attribute("gen_ai.operation.name", "execute_tool")
            span.set_attribute("gen_ai.tool.name", tool)
            span.set_attribute(TOOL_ATTR, tool)
            try:
                outcome, found = await self._call(tenant, tool, allowed, tokens, payload,
                                                  content_type, timeout_s, deadline, attributes)
            except ToolFailure as failure:
                outcome = ToolOutcome(error=failure.message, error_code=failure.code)
                found = failure.redacted
            if found:
                _record_redaction(span, tenant, tool, found)
            if outcome.error_code:
                span.set_attribute("error.type", outcome.error_code)
                span.set_status(trace.StatusCode.ERROR, outcome.error)
                log.info("tool call %s/%s failed: %s %s", tenant, tool, outcome.error_code, outcome.error)
            if self.metrics is not None and series is not None:
                self.metrics.tool_call(series, tool, outcome.error_code)
            return outcome

    async def _call(
        self, tenant: str, tool: str, allowed: Collection[str], tokens: CallTokens | None,
        payload: bytes, content_type: str, timeout_s: float | None, deadline: float,
        attributes: SpanAttributes,
    ) -> tuple[ToolOutcome, Redactions]:
        if tool not in allowed:
            declared = ", ".join(sorted(allowed)) or "none"
            raise ToolFailure(
                PERMISSION_DENIED,
                f"tool {tool!r} is not declared in this version's agent.toml [[tools]] (declared: {declared})",
            )
        left = deadline - self.clock()
        if left <= 0:
            raise ToolFailure(TIMEOUT, f"tool {tool!r} was not called: the invocation's deadline has passed")
        resolved = await self._resolve(tenant, tool, min(left, RESOLVE_TIMEOUT_S))
        if resolved is None:
            raise ToolFailure(
                NOT_FOUND, f"tool {tool!r} is not registered for tenant {tenant!r}; "
                f"register it with `corral tools create {tool}`",
            )
        limit, why = min(
            (resolved.timeout_s, "the tool's timeout"),
            (timeout_s if timeout_s and timeout_s > 0 else float("inf"), "the call's timeout"),
            (deadline - self.clock(), "the invocation's deadline"),
        )
        if limit <= 0:
            raise ToolFailure(TIMEOUT, f"tool {tool!r} was not called: {why} has passed")
        # This call's own token: a tool that misuses it cannot reach another tool with it, and it
        # is dead once the call is over, whatever the tool does with it later.
        credential = _mint(tokens, tool, self.clock() + limit)
        call = ToolCall(
            resolved, credential.token if credential else "",
            str(attributes.get("corral.invocation", "")), payload, content_type, limit,
        )
        try:
            async with asyncio.timeout(limit):
                outcome = await self._transport.send(call)
        except TimeoutError:
            raise ToolFailure(TIMEOUT, f"tool {tool!r} did not answer within {limit:.3g}s ({why})") from None
        except ToolFailure as failure:
            if failure.code == UNAVAILABLE:
                # Perhaps it moved: the next call asks the registry again instead of dialling
                # the cached address until the entry expires.
                self._cache.pop((tenant, tool), None)
            raise
        finally:
            if tokens is not None and credential is not None:
                tokens.revoke(credential)
        # A tool that echoes its request back would hand its secret and token to the sandbox.
        secrets = redaction.of_call(call)
        body = redaction.redact(outcome.payload, secrets)
        kind = redaction.redact(outcome.content_type.encode("utf-8", errors="replace"), secrets)
        if not (body.found or kind.found):
            return outcome, Redactions()
        return replace(
            outcome, payload=body.data, content_type=kind.data.decode("utf-8", errors="replace")
        ), body.found | kind.found

    async def _resolve(self, tenant: str, tool: str, timeout_s: float) -> ResolvedTool | None:
        key = (tenant, tool)
        cached = self._cache.get(key)
        now = self.clock()
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            resolved = await self.resolver.resolve(tenant, tool, timeout_s)
        except CorralError as exc:
            # Not for the agent to fix either (no key, an unreadable secret, a registry away).
            raise ToolFailure(
                UNAVAILABLE, f"tool {tool!r} could not be resolved: {exc.reason}: {exc.message}"
            ) from None
        self._cache[key] = (now + self.cache_ttl_s, resolved)
        return resolved


def _mint(tokens: CallTokens | None, tool: str, expires_at: float) -> Credential | None:
    if tokens is None:
        return None
    try:
        return tokens.mint(tool, expires_at)
    except Exception as exc:  # the agent gets a tool error, not a crashed turn
        log.exception("could not mint the token of a call to tool %s", tool)
        raise ToolFailure(
            UNAVAILABLE, f"tool {tool!r} was not called: this executor could not mint its "
            f"credential ({type(exc).__name__})",
        ) from None


def _record_redaction(span: trace.Span, tenant: str, tool: str, found: Redactions) -> None:
    """Tells operators a tool echoes its credentials: the agent got "[redacted]" in their place,
    but the tool has to be fixed (redaction cannot catch every encoding)."""
    forms, kinds = sorted(found.forms), sorted(found.kinds)
    span.add_event(REDACTED_EVENT, {
        "corral.tool.redacted_forms": forms, "corral.tool.redacted_credentials": kinds,
    })
    log.warning(
        "tool %s/%s echoed its credentials (%s) in forms %s; blanked out of its answer, but the "
        "tool must stop sending them back", tenant, tool, ", ".join(kinds), ", ".join(forms),
    )
