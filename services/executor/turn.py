"""One invocation, one turn of its session: the session's sandbox and state in, the agent run
under its deadline with its calls brokered, the new state committed out, all inside the
invocation's span."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator

from opentelemetry import trace
from opentelemetry.context import Context as OtelContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common.errors import (
    CorralError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    ResourceExhausted,
)
from services.common.execution import Completed, Started
from services.common.identity import Caller
from services.common.prometheus import OK, Series
from services.executor import replays
from services.executor.broker import ModelBroker
from services.executor.calls import AgentCalls, InvocationScope
from services.executor.credentials import InvocationCredentials, InvocationTokens
from services.executor.drivers.base import Limit
from services.executor.metrics import ExecutorMetrics
from services.executor.model import (
    AgentError,
    Event,
    FinishedTurn,
    Invocation,
    LogExport,
    LogOrigin,
    Sessions,
    SessionState,
    SpanExport,
    TurnInput,
    TurnOutput,
)
from services.executor.output import InvocationOutput
from services.executor.sandbox import AgentFailed, SandboxCrashed
from services.executor.sandboxes import SandboxTable, SessionSandbox
from services.executor.tools import ToolBroker

tracer = trace.get_tracer(__name__)
# Stamped by the executor on the agent's own spans, whatever the agent's code put there.
TRUSTED_SPAN_KEYS = ("corral.agent", "corral.version", "corral.endpoint", "corral.session",
                     "corral.tenant", "corral.user", "corral.invocation")


def invocation_attributes(caller: Caller, inv: Invocation) -> dict[str, str | int]:
    return {
        "corral.agent": inv.version.parent.name,
        "corral.version": inv.version.name,
        "corral.version.number": inv.version.number,
        "corral.endpoint": inv.endpoint,
        "corral.session": inv.session.name,
        "corral.tenant": caller.tenant,
        "corral.user": caller.user,
        "corral.invocation": inv.invocation_id,
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": inv.version.agent,
    }


class Turns:
    def __init__(
        self, table: SandboxTable, sessions: Sessions, spans: SpanExport, models: ModelBroker,
        tools: ToolBroker | None, credentials: InvocationCredentials, metrics: ExecutorMetrics,
        logs: LogExport | None = None,
    ) -> None:
        self._table, self._sessions, self._spans, self._logs = table, sessions, spans, logs
        self._metrics = metrics
        # What answers the agent's calls, and what authenticates them to tools.
        self._models, self._tools, self._credentials = models, tools, credentials

    async def run(
        self, caller: Caller, inv: Invocation, parent: OtelContext
    ) -> AsyncGenerator[Event, None]:
        """Started, the agent's output chunks, then Completed; or a domain error."""
        started = time.monotonic()
        attributes = invocation_attributes(caller, inv)
        series = Series.of(caller.tenant, inv.version, inv.endpoint)
        code = ""  # how it ended, once it has
        # An explicit span and context rather than "current span": this generator is suspended at
        # every yield, and the ambient context must not leak into the caller's.
        span = tracer.start_span(
            f"invoke_agent {inv.version.agent}", context=parent, kind=trace.SpanKind.SERVER,
            attributes=attributes,
        )
        scope_context = trace.set_span_in_context(span, parent)
        tokens: InvocationTokens | None = None
        output_log = InvocationOutput()
        try:
            bound = await self._table.sandbox_for(caller, inv)
            trace_id = format(span.get_span_context().trace_id, "032x")
            # Under the session's lease now: a turn committed under the request id is final.
            replay = await replays.recorded(self._sessions, caller, inv)
            if replay is not None:
                code = OK  # not an invocation of the agent: no metrics, no invoke_agent span
                _mark_replay(span, inv, replay.turn)
                for event in replays.events(replay, int((time.monotonic() - started) * 1000)):
                    yield event
                return
            yield Started(trace_id)
            deadline = time.time() + bound.manifest.timeout_s
            tokens = self._credentials.open(caller, inv, bound.manifest, deadline)
            token = tokens.agent.token if tokens else ""
            calls = AgentCalls(self._models, self._tools, InvocationScope(
                caller, bound.manifest, tokens, attributes, scope_context, deadline, series))
            output: list[bytes] = []
            done: TurnOutput | None = None
            turn = _turn_input(caller, inv, bound, scope_context, token, deadline)
            exchange = self._exchange(bound, turn, calls, output_log)
            async with contextlib.aclosing(exchange) as items:
                async for item in items:
                    if isinstance(item, TurnOutput):
                        done = item
                    else:
                        output.append(item)
                        yield item
            assert done is not None
            self._spans.forward(done.otlp_spans, {k: str(attributes[k]) for k in TRUSTED_SPAN_KEYS})
            committed = await self._commit(caller, inv, bound, done, b"".join(output), trace_id)
            span.set_attribute("corral.turn", committed.turn_count)
            span.set_status(trace.StatusCode.OK)
            code = OK
            self._metrics.invocation(series, code, time.monotonic() - started)
            yield Completed(int((time.monotonic() - started) * 1000), committed.turn_count)
        except BaseException as exc:
            if code:  # closed once Completed was out: nothing failed
                raise
            code = "CANCELLED"
            if isinstance(exc, AgentError):
                span.add_event("exception", exc.exception_attributes())
            if not isinstance(exc, GeneratorExit | asyncio.CancelledError):
                code = exc.reason if isinstance(exc, CorralError) else type(exc).__name__
                span.set_status(trace.StatusCode.ERROR, str(exc)[:500])
                span.set_attribute("error.type", code)
            self._metrics.invocation(series, code, time.monotonic() - started)
            raise
        finally:
            span.end()
            self._forward_output(output_log, attributes, span)
            if tokens is not None:
                # The invocation is over: its tokens must not work a moment longer.
                tokens.close()

    def _forward_output(
        self, output: InvocationOutput, attributes: dict[str, str | int], span: trace.Span
    ) -> None:
        """The agent's output, stamped with the invocation's names and span, to telemetry."""
        lines = output.lines()
        if self._logs is None or not lines:
            return
        context = span.get_span_context()
        valid = context.is_valid  # not without a tracer provider (tracing off, in-process tests)
        self._logs.forward(lines, LogOrigin(
            {k: str(attributes[k]) for k in TRUSTED_SPAN_KEYS},
            format(context.trace_id, "032x") if valid else "",
            format(context.span_id, "016x") if valid else "",
        ))

    async def _exchange(
        self, bound: SessionSandbox, turn: TurnInput, calls: AgentCalls, output: InvocationOutput
    ) -> AsyncGenerator[bytes | TurnOutput, None]:
        """The turn inside the sandbox, its failures as the caller should see them. Whatever
        interrupts a turn but the agent's own exception ends the sandbox: its worker may still be
        busy with the turn, so it cannot serve the next one."""
        manifest = bound.manifest
        try:
            async with asyncio.timeout(manifest.timeout_s):
                run = bound.sandbox.run(turn, calls.model, calls.tool, output.take)
                async with contextlib.aclosing(run) as items:
                    async for item in items:
                        yield item
        except TimeoutError:
            await self._table.drop(bound.key)
            raise DeadlineExceeded(
                f"{bound.session}: the agent did not finish within resources.timeout_s="
                f"{manifest.timeout_s}s", reason="INVOCATION_TIMEOUT",
            ) from None
        except AgentFailed as exc:
            raise AgentError(
                f"the agent raised {exc.error_type}: {exc.message}", reason="AGENT_ERROR",
                metadata={"error_type": exc.error_type}, stack=exc.traceback,
                agent_exception=exc.error_type, agent_message=exc.message,
            ) from None
        except SandboxCrashed as exc:
            raise await self._crashed(bound, exc) from None
        except BaseException:
            # Cancelled mid-stream (the caller went away), or closed at a yield.
            await self._table.drop(bound.key)
            raise

    async def _crashed(self, bound: SessionSandbox, exc: SandboxCrashed) -> CorralError:
        """Why the sandbox went away mid-turn, once the driver has said (its limits)."""
        process = bound.sandbox.process
        await self._table.drop(bound.key)  # waits for the driver's verdict on why it ended
        limit = process.limit_hit if process is not None else None
        session, manifest = bound.session, bound.manifest
        if bound.stopped:
            return FailedPrecondition(
                f"{session} was stopped while this invocation was running", reason="SESSION_STOPPED")
        if limit is Limit.MEMORY:
            return ResourceExhausted(
                f"{session}: the agent went over its memory limit (resources.memory_mb="
                f"{manifest.memory_mb}) and was stopped", reason="MEMORY_LIMIT")
        if limit is Limit.CPU:
            return ResourceExhausted(
                f"{session}: the agent used up its CPU time (resources.cpu_seconds="
                f"{manifest.cpu_seconds}) and was stopped", reason="CPU_LIMIT")
        return Internal(f"{session}: the sandbox crashed: {exc}", reason="SANDBOX_CRASHED")

    async def _commit(
        self, caller: Caller, inv: Invocation, bound: SessionSandbox, done: TurnOutput, output: bytes,
        trace_id: str,
    ) -> SessionState:
        turn = FinishedTurn(
            invocation_id=inv.invocation_id, input=inv.payload, output=output, state=done.state,
            request=replays.turn_request(inv, trace_id),
        )
        try:
            committed = await self._sessions.commit(
                caller, inv.session, bound.lease_id, bound.committed.etag, turn
            )
        except BaseException:
            # Another writer moved the state (or the commit's fate is unknown): the sandbox's
            # idea of it can no longer be trusted.
            await self._table.drop(bound.key)
            raise
        bound.committed = committed
        bound.sandbox.last_used = time.monotonic()
        return committed


def _mark_replay(span: trace.Span, inv: Invocation, turn: int) -> None:
    """Names the span for what happened: a recorded turn sent again, not the agent invoked."""
    span.update_name(f"{replays.REPLAY_OPERATION} {inv.version.agent}")
    span.set_attribute("gen_ai.operation.name", replays.REPLAY_OPERATION)
    span.set_attribute("corral.replayed", True)
    span.set_attribute("corral.turn", turn)
    span.set_status(trace.StatusCode.OK)


def _turn_input(
    caller: Caller, inv: Invocation, bound: SessionSandbox, context: OtelContext, token: str,
    deadline: float,
) -> TurnInput:
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=context)
    return TurnInput(
        invocation_id=inv.invocation_id, session_id=inv.session.session, version=inv.version.name,
        payload=inv.payload, content_type=inv.content_type, state=bound.committed.state,
        traceparent=carrier.get("traceparent", ""), endpoint=inv.endpoint, tenant=caller.tenant,
        user=caller.user, credentials=token, deadline_unix_ms=int(deadline * 1000),
    )
