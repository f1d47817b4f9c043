"""How the executor reaches a tenant's tool: an HTTP POST, or the corral.tools.v1 gRPC Invoke,
carrying the invocation's token, the tool's secret and the trace context; only to an address the
outbound policy allows (checked at every call, and the checked address is the one dialled), and
never echoing a secret back into an error."""

from __future__ import annotations

import grpc
import httpx
from opentelemetry import propagate

from corral.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common.outbound import (
    Destination,
    IPAddress,
    OutboundPolicy,
    OutboundRefused,
    Unresolved,
)
from services.common.outbound_http import pinned_client
from services.common.settings import Settings
from services.executor import redaction
from services.executor.model import (
    PERMISSION_DENIED,
    TOOL_ERROR,
    UNAVAILABLE,
    Redactions,
    ToolCall,
    ToolFailure,
    ToolOutcome,
)

MAX_MESSAGE_CHARS = 200


class ToolTransport:
    """The executor's ToolSender."""

    def __init__(self, max_payload: int, policy: OutboundPolicy) -> None:
        self.max_payload = max_payload
        self.policy = policy
        # No redirects: following one would hand the token and the secret to another host. No
        # proxies from the environment either: tool traffic carries both.
        self._http = pinned_client(policy)
        # A channel per (authority, checked address).
        self._channels: dict[tuple[str, IPAddress], grpc.aio.Channel] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ToolTransport:
        return cls(settings.executor.max_payload_bytes, OutboundPolicy(settings.outbound_allow))

    async def close(self) -> None:
        await self._http.aclose()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    async def send(self, call: ToolCall) -> ToolOutcome:
        """The tool's answer; ToolFailure when it refuses, cannot be reached or lives where the
        outbound policy forbids (PERMISSION_DENIED) or does not resolve, TimeoutError when it runs out of time."""
        try:
            if call.tool.kind == "http":
                return await self._http_call(call)
            return await self._grpc_call(call, await self.policy.check_grpc(call.tool.address))
        except Unresolved as exc:  # the name may resolve again: worth a retry, unlike a refusal
            raise ToolFailure(UNAVAILABLE, f"tool {call.tool.tool!r}: {exc}") from None
        except OutboundRefused as exc:
            raise ToolFailure(PERMISSION_DENIED, f"tool {call.tool.tool!r}: {exc}") from None

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

    async def _grpc_call(self, call: ToolCall, destination: Destination) -> ToolOutcome:
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
        stub = tools_pb2_grpc.ToolServiceStub(self._channel(destination))
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

    def _channel(self, destination: Destination) -> grpc.aio.Channel:
        """A channel dialling exactly the checked address (gRPC resolves nothing itself), with
        the tool's name as the :authority. Keyed by both, so a name resolving to several
        addresses keeps one channel per address."""
        key = (destination.target.authority, destination.address)
        if key not in self._channels:
            self._channels[key] = grpc.aio.insecure_channel(destination.grpc_target, options=[
                ("grpc.max_receive_message_length", self.max_payload),
                ("grpc.max_send_message_length", self.max_payload),
                ("grpc.default_authority", destination.target.authority),
            ])
        return self._channels[key]


def _short(text: bytes | str, call: ToolCall) -> tuple[str, Redactions]:
    """A one-line excerpt of a tool's error for the agent, with the call's credentials blanked
    out of the whole text before it is cut (a cut could split an echoed secret), and the forms
    they were found in."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", errors="replace")
    redacted = redaction.redact(data, redaction.of_call(call))
    value = " ".join(redacted.data.decode("utf-8", errors="replace").split())
    value = value if len(value) <= MAX_MESSAGE_CHARS else value[: MAX_MESSAGE_CHARS - 1] + "…"
    return value, redacted.found
