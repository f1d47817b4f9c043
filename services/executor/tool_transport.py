"""How the executor reaches a tenant's tool: an HTTP POST, or the corral.tools.v1 gRPC Invoke,
carrying the invocation's token, the tool's secret and the trace context; never to an address a
tenant may not reach through the executor, and never echoing a secret back into an error."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

import grpc
import httpx
from opentelemetry import propagate

from corral.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common.settings import Settings
from services.executor import redaction
from services.executor.model import (
    PERMISSION_DENIED,
    TOOL_ERROR,
    UNAVAILABLE,
    Redactions,
    ResolvedTool,
    ToolCall,
    ToolFailure,
    ToolOutcome,
)

MAX_MESSAGE_CHARS = 200


class ToolTransport:
    """The executor's ToolSender."""

    def __init__(self, max_payload: int, allow_loopback: bool) -> None:
        self.max_payload = max_payload
        self.allow_loopback = allow_loopback
        # No redirects: following one would hand the token and the secret to another host. No
        # proxies from the environment either: tool traffic carries both.
        self._http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        self._channels: dict[str, grpc.aio.Channel] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ToolTransport:
        return cls(settings.executor.max_payload_bytes, settings.executor.tools_allow_loopback)

    async def close(self) -> None:
        await self._http.aclose()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    async def send(self, call: ToolCall) -> ToolOutcome:
        """The tool's answer; ToolFailure when it refuses or cannot be reached, TimeoutError
        when it runs out of time."""
        await self._check_destination(call.tool)
        if call.tool.kind == "http":
            return await self._http_call(call)
        return await self._grpc_call(call)

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

    async def _http_call(self, call: ToolCall) -> ToolOutcome:
        t, token, invocation = call.tool, call.token, call.invocation
        headers = {"Content-Type": call.content_type or "application/octet-stream"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if t.secret:
            headers["X-Corral-Tool-Secret"] = t.secret
        if invocation:
            headers["X-Corral-Invocation"] = invocation
        propagate.inject(headers)  # the tool's own spans join the invocation's trace
        try:
            async with self._http.stream(
                "POST", t.address, content=call.payload, headers=headers, timeout=call.limit_s
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
            excerpt, forms = _short(body, call)
            raise ToolFailure(
                TOOL_ERROR, f"tool {t.tool!r} answered HTTP {response.status_code}: {excerpt}",
                redacted=forms,
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

    async def _grpc_call(self, call: ToolCall) -> ToolOutcome:
        t, token, invocation = call.tool, call.token, call.invocation
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
                tools_pb2.InvokeRequest(payload=call.payload, content_type=call.content_type),
                metadata=tuple(metadata), timeout=call.limit_s,
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError from None
            excerpt, forms = _short(exc.details() or "", call)
            if code == grpc.StatusCode.UNAVAILABLE:
                raise ToolFailure(
                    UNAVAILABLE, f"tool {t.tool!r} is unavailable: {excerpt}", redacted=forms
                ) from None
            raise ToolFailure(
                TOOL_ERROR, f"tool {t.tool!r} failed with gRPC {code.name}: {excerpt}", redacted=forms
            ) from None
        return ToolOutcome(payload=answer.payload, content_type=answer.content_type)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=[
                ("grpc.max_receive_message_length", self.max_payload),
                ("grpc.max_send_message_length", self.max_payload),
            ])
        return self._channels[address]


def _short(text: bytes | str, call: ToolCall) -> tuple[str, Redactions]:
    """A one-line excerpt of a tool's error for the agent, with the call's credentials blanked
    out of the whole text before it is cut (a cut could split an echoed secret), and the forms
    they were found in."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", errors="replace")
    redacted = redaction.redact(data, redaction.of_call(call))
    value = " ".join(redacted.data.decode("utf-8", errors="replace").split())
    value = value if len(value) <= MAX_MESSAGE_CHARS else value[: MAX_MESSAGE_CHARS - 1] + "…"
    return value, redacted.found
