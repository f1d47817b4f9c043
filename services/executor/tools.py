"""The tool broker: a sandbox's tool calls go to the tenant's registered tools from here, with the
invocation's token and the tool's secret attached here, so the sandbox needs no network and never
sees a secret. Each call is an `execute_tool {tool}` span (telemetry counts calls and failures)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from urllib.parse import urlsplit

import grpc
import httpx
from opentelemetry import propagate, trace
from opentelemetry.context import Context

from corral.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common.errors import CorralError
from services.common.settings import Settings
from services.executor.clients import RegistryToolResolver
from services.executor.model import ResolvedTool, SpanAttributes, ToolOutcome, ToolResolver

__all__ = [
    "NOT_FOUND", "PERMISSION_DENIED", "TIMEOUT", "TOOL_ATTR", "TOOL_ERROR", "UNAVAILABLE",
    "RegistryToolResolver", "ResolvedTool", "ToolBroker", "ToolFailure", "ToolOutcome",
]

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

# The attribute telemetry counts tool calls by (services/telemetry/evaluation_store.py).
TOOL_ATTR = "corral.tool.name"
# How long a resolved tool (or the fact that it does not exist) is reused: a changed address or
# secret reaches running agents within this long, and the registry is not asked on every call.
CACHE_TTL_S = 10.0
RESOLVE_TIMEOUT_S = 5.0
MAX_MESSAGE_CHARS = 200

PERMISSION_DENIED = "PERMISSION_DENIED"
NOT_FOUND = "NOT_FOUND"
TIMEOUT = "TIMEOUT"
UNAVAILABLE = "UNAVAILABLE"
TOOL_ERROR = "TOOL_ERROR"


class ToolFailure(Exception):
    """A call failed in a way the agent is told about; the message never holds a secret."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ToolBroker:
    def __init__(
        self,
        settings: Settings,
        *,
        resolver: ToolResolver | None = None,
        tracer: trace.Tracer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.resolver = resolver or RegistryToolResolver(settings)
        self.tracer = tracer or _tracer
        self.clock = clock
        self.max_payload = settings.executor.max_payload_bytes
        self.allow_loopback = settings.executor.tools_allow_loopback
        # No redirects: following one would hand the token and the secret to another host. No
        # proxies from the environment either: tool traffic carries both.
        self._http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._cache: dict[tuple[str, str], tuple[float, ResolvedTool | None]] = {}

    async def close(self) -> None:
        await self._http.aclose()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        await self.resolver.close()

    async def call(
        self,
        *,
        tenant: str,
        tool: str,
        allowed: Collection[str],
        token: str,
        payload: bytes,
        content_type: str,
        timeout_s: float | None,
        deadline: float,
        attributes: SpanAttributes,
        context: Context | None,
    ) -> ToolOutcome:
        """Calls `tool` of `tenant` if the version declares it (`allowed`: agent.toml's [[tools]]
        names). `deadline` is the invocation's, in Unix seconds (time.time()); the call gets the
        least of the tool's timeout, `timeout_s` and the time left to it."""
        with self.tracer.start_as_current_span(
            f"execute_tool {tool}", context=context, kind=trace.SpanKind.CLIENT,
            attributes=dict(attributes),
        ) as span:
            span.set_attribute("gen_ai.operation.name", "execute_tool")
            span.set_attribute("gen_ai.tool.name", tool)
            span.set_attribute(TOOL_ATTR, tool)
            try:
                outcome = await self._call(tenant, tool, allowed, token, payload, content_type,
                                           timeout_s, deadline, attributes)
            except ToolFailure as failure:
                outcome = ToolOutcome(error=failure.message, error_code=failure.code)
            if outcome.error_code:
                span.set_attribute("error.type", outcome.error_code)
                span.set_status(trace.StatusCode.ERROR, outcome.error)
                log.info("tool call %s/%s failed: %s %s", tenant, tool, outcome.error_code, outcome.error)
            return outcome

    async def _call(
        self, tenant: str, tool: str, allowed: Collection[str], token: str, payload: bytes,
        content_type: str, timeout_s: float | None, deadline: float, attributes: SpanAttributes,
    ) -> ToolOutcome:
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
        secrets = tuple(s for s in (resolved.secret, token) if s)
        invocation = str(attributes.get("corral.invocation", ""))
        try:
            async with asyncio.timeout(limit):
                await self._check_destination(resolved)
                if resolved.kind == "http":
                    outcome = await self._http_call(resolved, token, invocation, payload,
                                                    content_type, limit, secrets)
                else:
                    outcome = await self._grpc_call(resolved, token, invocation, payload,
                                                    content_type, limit, secrets)
        except TimeoutError:
            raise ToolFailure(TIMEOUT, f"tool {tool!r} did not answer within {limit:.3g}s ({why})") from None
        if resolved.secret and resolved.secret.encode() in outcome.payload:
            # A tool that echoes its request back would hand its own secret to the sandbox.
            outcome = replace(outcome, payload=outcome.payload.replace(
                resolved.secret.encode(), b"[redacted]"))
        return outcome

    async def _check_destination(self, tool: ResolvedTool) -> None:
        """Refuses addresses a tenant must not reach through the executor: link-local (cloud
        metadata services), multicast and unspecified ones always, loopback unless the operator
        allows it (a one-machine set-up). Private networks, where tool services live, are fine."""
        host = urlsplit(tool.address).hostname if tool.kind == "http" else tool.address.rpartition(":")[0]
        host = (host or "").strip("[]")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError:
            return  # the call itself reports the unreachable host
        for *_, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0])
            if ip.is_link_local or ip.is_multicast or ip.is_unspecified or (
                ip.is_loopback and not self.allow_loopback
            ):
                raise ToolFailure(
                    PERMISSION_DENIED,
                    f"tool {tool.tool!r} resolves to {ip}, an address tools may not use "
                    "(link-local, multicast, unspecified, or loopback without "
                    "CORRAL_TOOLS_ALLOW_LOOPBACK=true)",
                )

    async def _resolve(self, tenant: str, tool: str, timeout_s: float) -> ResolvedTool | None:
        key = (tenant, tool)
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            resolved = await self.resolver.resolve(tenant, tool, timeout_s)
        except CorralError as exc:
            # Not for the agent to fix either (no key, an unreadable secret, a registry away).
            raise ToolFailure(
                UNAVAILABLE, f"tool {tool!r} could not be resolved: {exc.reason}: {exc.message}"
            ) from None
        self._cache[key] = (now + CACHE_TTL_S, resolved)
        return resolved

    async def _http_call(
        self, t: ResolvedTool, token: str, invocation: str, payload: bytes, content_type: str,
        limit: float, secrets: tuple[str, ...],
    ) -> ToolOutcome:
        headers = {"Content-Type": content_type or "application/octet-stream"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if t.secret:
            headers["X-Corral-Tool-Secret"] = t.secret
        if invocation:
            headers["X-Corral-Invocation"] = invocation
        propagate.inject(headers)  # the tool's own spans join the invocation's trace
        try:
            async with self._http.stream(
                "POST", t.address, content=payload, headers=headers, timeout=limit
            ) as response:
                body = await self._read(response, t.tool)
        except httpx.TimeoutException:
            raise TimeoutError from None
        except httpx.ConnectError:
            raise ToolFailure(UNAVAILABLE, f"tool {t.tool!r} could not be reached (connection failed)") from None
        except httpx.HTTPError as exc:
            raise ToolFailure(
                UNAVAILABLE, f"tool {t.tool!r} could not be reached ({type(exc).__name__})"
            ) from None
        if not 200 <= response.status_code < 300:
            raise ToolFailure(
                TOOL_ERROR,
                f"tool {t.tool!r} answered HTTP {response.status_code}: {_short(body, secrets)}",
            )
        return ToolOutcome(payload=body, content_type=response.headers.get("content-type", ""))

    async def _read(self, response: httpx.Response, tool: str) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.max_payload:
                raise ToolFailure(TOOL_ERROR, f"tool {tool!r} answered more than {self.max_payload} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def _grpc_call(
        self, t: ResolvedTool, token: str, invocation: str, payload: bytes, content_type: str,
        limit: float, secrets: tuple[str, ...],
    ) -> ToolOutcome:
        metadata: list[tuple[str, str]] = []
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        if t.secret:
            metadata.append(("x-corral-tool-secret", t.secret))
        if invocation:
            metadata.append(("x-corral-invocation", invocation))
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        metadata.extend(carrier.items())
        stub = tools_pb2_grpc.ToolServiceStub(self._channel(t.address))
        try:
            answer = await stub.Invoke(
                tools_pb2.InvokeRequest(payload=payload, content_type=content_type),
                metadata=tuple(metadata), timeout=limit,
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError from None
            if code == grpc.StatusCode.UNAVAILABLE:
                raise ToolFailure(
                    UNAVAILABLE, f"tool {t.tool!r} is unavailable: {_short(exc.details() or '', secrets)}"
                ) from None
            raise ToolFailure(
                TOOL_ERROR, f"tool {t.tool!r} failed with gRPC {code.name}: {_short(exc.details() or '', secrets)}"
            ) from None
        return ToolOutcome(payload=answer.payload, content_type=answer.content_type)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=[
                ("grpc.max_receive_message_length", self.max_payload),
                ("grpc.max_send_message_length", self.max_payload),
            ])
        return self._channels[address]


def _short(text: bytes | str, secrets: tuple[str, ...]) -> str:
    """A one-line excerpt of a tool's error for the agent, with any secret the tool echoed back
    (its own, or the invocation's token) blanked out."""
    value = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    for secret in secrets:
        value = value.replace(secret, "[redacted]")
    value = " ".join(value.split())
    return value if len(value) <= MAX_MESSAGE_CHARS else value[: MAX_MESSAGE_CHARS - 1] + "…"
