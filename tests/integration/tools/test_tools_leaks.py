"""What a misbehaving tool cannot leak through the executor's real ToolBroker: loopback tool
services (HTTP and gRPC) that echo their secret and token in every encoding, and tools that
verify their token with corral.verify against the executor's real JWKS and Redis revocation
list: a token handed to one tool is refused by another and dies with its call."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, quote_plus, unquote_plus, unquote_to_bytes

import grpc
import pytest
import pytest_asyncio
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from corral.names import SessionRef, VersionRef
from corral.registry.v1 import tools_pb2 as pb
from corral.tools.v1 import tools_pb2 as tool_api
from corral.tools.v1 import tools_pb2_grpc as tool_api_grpc
from corral.verify import (
    InvalidInvocationToken,
    InvocationClaims,
    averify_invocation_token,
    verifier_for,
)
from services.common.identity import Caller
from services.common.kv import create_redis
from services.executor.clients import RegistryToolResolver
from services.executor.credentials import CredentialIssuer, InvocationCredentials, InvocationTokens
from services.executor.http import ExecutorHttp
from services.executor.keys import KeyRing
from services.executor.model import TIMEOUT, TOOL_ERROR, Invocation, ToolOutcome
from services.executor.store import RedisRevocations
from services.executor.tool_transport import ToolTransport
from services.executor.tools import REDACTED_EVENT, ToolBroker
from tests.tool_registry import Registry, seconds

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# Printable ASCII (the registry's rule for a secret, which travels as a header) with every
# character JSON, URL and base64 treat specially.
SECRET = 'sk-"quoted"\\back\\slash/plus+eq=' + uuid.uuid4().hex[:12]
TOOL_TIMEOUT_S = 2.0


def _b64(data: str, *, urlsafe: bool = False, pad: bool = True) -> str:
    encoded = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data.encode()).decode()
    return encoded if pad else encoded.rstrip("=")


# Each echo route gives the secret back in one form; "blob{k}" hides it in a base64 dump of the
# request's headers behind k bytes, so it starts at each of the three byte offsets.
ECHOES: dict[str, Callable[[str], str]] = {
    "raw": lambda s: f"key={s}",
    "json": lambda s: json.dumps({"X-Corral-Tool-Secret": s}),
    "json_slash": lambda s: json.dumps({"X-Corral-Tool-Secret": s}).replace("/", "\\/"),
    "url": lambda s: f"https://callback.example/?key={quote(s, safe='')}",
    "url_path": lambda s: f"https://callback.example/{quote(s)}",
    "url_plus": lambda s: f"key={quote_plus(s)}",
    "base64": lambda s: _b64(s),
    "base64_nopad": lambda s: _b64(s, pad=False),
    "base64url": lambda s: _b64(s, urlsafe=True),
    "base64url_nopad": lambda s: _b64(s, urlsafe=True, pad=False),
    "blob0": lambda s: _b64(json.dumps({"X-Corral-Tool-Secret": s, "n": 1})),
    "blob1": lambda s: _b64("x" + json.dumps({"X-Corral-Tool-Secret": s, "n": 1})),
    "blob2": lambda s: _b64("xy" + f"secret: {s}; end"),
    "blob2url": lambda s: _b64("xy" + f"secret: {s}; end", urlsafe=True, pad=False),
    "reversed": lambda s: s[::-1],
}


def leaked(text: bytes | str, secret: str) -> list[str]:
    """How `secret` can still be read out of `text` by an agent that undoes the usual encodings
    (JSON escapes, URL encoding, reversal, base64 at any alignment of any fragment)."""
    data = text.encode() if isinstance(text, str) else text
    readings = [("raw", data), ("url", unquote_to_bytes(data)),
                ("url", unquote_plus(data.decode(errors="replace")).encode()),
                ("json", _unescape(data)), ("reversed", data[::-1])]
    for piece in re.findall(rb"[A-Za-z0-9+/_=-]{8,}", data):
        for start in range(4):
            chunk = piece[start:].rstrip(b"=")
            chunk = chunk + b"=" * (-len(chunk) % 4)
            for decode in (base64.b64decode, base64.urlsafe_b64decode):
                try:
                    decoded = decode(chunk)
                except (binascii.Error, ValueError):
                    continue
                readings += [("base64", decoded), ("base64", _unescape(decoded))]
    return sorted({name for name, reading in readings if secret.encode() in reading})


def _unescape(data: bytes) -> bytes:
    """JSON string escapes undone, wherever they are (the text need not parse as JSON)."""
    return re.sub(rb'\\(["\\/])', rb"\1", data)


@dataclass
class Verified:
    """What the verifying tools saw: each token and what corral.verify made of it."""

    tokens: dict[str, list[str]] = field(default_factory=dict)
    claims: dict[str, list[InvocationClaims]] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


def _tool_app(jwks_url: str, verified: Verified) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        form = request.match_info["form"]
        secret = request.headers.get("X-Corral-Tool-Secret", "")
        if form == "token":
            return web.json_response({"authorization": request.headers.get("Authorization")})
        if form == "error":
            return web.Response(status=500, text=f"bad key {_b64(secret)} ({json.dumps(secret)})")
        return web.Response(text=ECHOES[form](secret), content_type="text/plain")

    async def verify(request: web.Request) -> web.Response:
        """A tool as its author writes it: its own name is the audience it accepts."""
        name = request.match_info["name"]
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        verified.tokens.setdefault(name, []).append(token)
        verified.arrived.set()
        if name.startswith("slow"):
            await asyncio.wait_for(verified.release.wait(), 20)
        try:
            claims = await averify_invocation_token(token, audience=name, jwks_url=jwks_url)
        except InvalidInvocationToken as exc:
            return web.json_response({"refused": exc.reason}, status=401)
        verified.claims.setdefault(name, []).append(claims)
        return web.json_response({"tool": name, "aud": list(claims.audience)})

    app = web.Application()
    app.add_routes([web.post("/echo/{form}", echo), web.post("/verify/{name}", verify)])
    return app


class _GrpcEcho(tool_api_grpc.ToolServiceServicer):
    async def Invoke(
        self, request: tool_api.InvokeRequest, context: grpc.aio.ServicerContext  # type: ignore[type-arg]
    ) -> tool_api.InvokeResponse:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        secret = metadata.get("x-corral-tool-secret", "")
        if request.payload == b"fail":
            await context.abort(grpc.StatusCode.INTERNAL, f"rejected {quote_plus(secret)}")
        return tool_api.InvokeResponse(
            payload=_b64(json.dumps(metadata)).encode(), content_type="application/base64")


@dataclass
class Leaky:
    registry: Registry
    broker: ToolBroker
    exporter: InMemorySpanExporter
    credentials: InvocationCredentials
    tokens: InvocationTokens
    verified: Verified
    jwks_url: str

    async def call(self, tool: str, payload: bytes = b"{}", *, timeout_s: float | None = None) -> ToolOutcome:
        return await self.broker.call(
            tenant=self.registry.tenant, tool=tool, allowed=(tool,), tokens=self.tokens,
            payload=payload, content_type="application/json", timeout_s=timeout_s,
            deadline=time.time() + 30, attributes={"corral.invocation": "inv-1"}, context=None,
        )

    async def verify(self, token: str, audience: str, **options: object) -> InvocationClaims:
        return await averify_invocation_token(
            token, audience=audience, jwks_url=self.jwks_url, **options)  # type: ignore[arg-type]

    async def revoked_in_redis(self) -> None:
        """Lets the background revocations land (they are fire-and-forget for the broker)."""
        await self.credentials.close()


@pytest_asyncio.fixture
async def leaky(registry: Registry, redis_url: str, tmp_path: Path) -> AsyncIterator[Leaky]:
    redis = create_redis(redis_url)
    issuer = CredentialIssuer(
        KeyRing(tmp_path / "keys", rotation_s=3600, retain_s=600),
        RedisRevocations(redis, f"corral-test-{uuid.uuid4().hex[:8]}:"), "executor@test",
    )
    executor_http = ExecutorHttp(issuer, CollectorRegistry(), "127.0.0.1", 0)
    await executor_http.start()
    jwks_url = f"http://127.0.0.1:{executor_http.port}/.well-known/jwks.json"
    verified = Verified()
    runner = web.AppRunner(_tool_app(jwks_url, verified), shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    server = grpc.aio.server()
    tool_api_grpc.add_ToolServiceServicer_to_server(_GrpcEcho(), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for form in [*ECHOES, "token", "error"]:
        await registry.create(f"echo_{form}", SECRET, address=f"{base}/echo/{form}")
    for name in ("alpha", "beta", "slow_alpha"):
        await registry.create(name, SECRET, address=f"{base}/verify/{name}",
                              timeout=seconds(TOOL_TIMEOUT_S))
    await registry.create("echo_rpc", SECRET, kind=pb.TOOL_KIND_GRPC, address=f"127.0.0.1:{grpc_port}")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    broker = ToolBroker(
        resolver=RegistryToolResolver(registry.settings.for_service("executor")),
        transport=ToolTransport.from_settings(registry.settings), tracer=provider.get_tracer("test"))
    credentials = InvocationCredentials(issuer)
    inv = Invocation(session=SessionRef("s1"), version=VersionRef("agent", 3), digest="d",
                     endpoint="", invocation_id="inv-1", payload=b"", content_type="")
    tokens = InvocationTokens(credentials, Caller(registry.tenant, "alice"), inv, time.time() + 60)
    try:
        yield Leaky(registry, broker, exporter, credentials, tokens, verified, jwks_url)
    finally:
        verified.release.set()
        tokens.close()
        await credentials.close()
        await broker.close()
        await verifier_for(jwks_url).aclose()
        await server.stop(0)
        await runner.cleanup()
        await executor_http.close()
        provider.shutdown()
        await redis.aclose()


@pytest.mark.parametrize("form", list(ECHOES))
async def test_the_agent_never_sees_the_secret_echoed_in_any_form(leaky: Leaky, form: str) -> None:
    sent = ECHOES[form](SECRET)
    assert leaked(sent, SECRET), "the echo gives the secret away before redaction"
    outcome = await leaky.call(f"echo_{form}")
    assert outcome.error_code == "" and b"[redacted]" in outcome.payload
    assert leaked(outcome.payload, SECRET) == []
    [span] = leaky.exporter.get_finished_spans()
    [event] = [e for e in span.events if e.name == REDACTED_EVENT]
    assert dict(event.attributes or {})["corral.tool.redacted_credentials"] == ("tool_secret",)
    assert leaked(span.to_json(), SECRET) == []


async def test_an_echoed_token_and_echoes_in_errors_and_over_grpc_are_redacted(leaky: Leaky) -> None:
    token = await leaky.call("echo_token")
    assert json.loads(token.payload) == {"authorization": "Bearer [redacted]"}
    error = await leaky.call("echo_error")
    assert error.error_code == TOOL_ERROR and "bad key [redacted]" in error.error
    assert leaked(error.error, SECRET) == []
    rpc = await leaky.call("echo_rpc")
    assert rpc.error_code == "" and leaked(rpc.payload, SECRET) == []
    rpc_error = await leaky.call("echo_rpc", b"fail")
    assert rpc_error.error_code == TOOL_ERROR and "rejected [redacted]" in rpc_error.error
    events = {s.name: [dict(e.attributes or {}) for e in s.events] for s in leaky.exporter.get_finished_spans()}
    assert events["execute_tool echo_token"][0]["corral.tool.redacted_credentials"] == ("call_token",)
    assert set(events["execute_tool echo_error"][0]["corral.tool.redacted_forms"]) == {  # type: ignore[arg-type]
        "base64", "json"}
    assert events["execute_tool echo_rpc"] and events["execute_tool echo_rpc"][0]


async def test_a_token_handed_to_one_tool_is_refused_by_another_and_dies_with_its_call(
    leaky: Leaky,
) -> None:
    started = time.time()
    assert json.loads((await leaky.call("alpha")).payload) == {"tool": "alpha", "aud": ["alpha"]}
    assert json.loads((await leaky.call("beta")).payload) == {"tool": "beta", "aud": ["beta"]}
    [alpha_token], [beta_token] = leaky.verified.tokens["alpha"], leaky.verified.tokens["beta"]
    [alpha] = leaky.verified.claims["alpha"]
    assert alpha_token != beta_token and alpha.invocation_id == "inv-1"
    # Alive no longer than the call: the tool's timeout, rounded up to the second.
    assert alpha.expires_at <= math.ceil(started + TOOL_TIMEOUT_S) + 1

    # Tool alpha replaying its token at tool beta: beta's check refuses it, whatever its state.
    with pytest.raises(InvalidInvocationToken) as refused:
        await leaky.verify(alpha_token, "beta", check_revocation=False)
    assert refused.value.reason == "wrong audience"
    # And the call is over, so the token is dead for alpha too.
    await leaky.revoked_in_redis()
    with pytest.raises(InvalidInvocationToken) as dead:
        await leaky.verify(alpha_token, "alpha")
    assert dead.value.reason == "revoked"
    # Even without asking the deny-list, it expires with its call.
    await asyncio.sleep(max(0.0, alpha.expires_at - time.time()) + 0.1)
    with pytest.raises(InvalidInvocationToken) as expired:
        await leaky.verify(alpha_token, "alpha", check_revocation=False, leeway_s=0)
    assert expired.value.reason == "expired"


async def test_a_timed_out_calls_token_is_dead_when_the_tool_gets_round_to_it(leaky: Leaky) -> None:
    outcome = await leaky.call("slow_alpha", timeout_s=0.5)
    assert outcome.error_code == TIMEOUT
    await leaky.revoked_in_redis()
    leaky.verified.release.set()  # the tool, still working, checks its token only now
    [token] = leaky.verified.tokens["slow_alpha"]
    with pytest.raises(InvalidInvocationToken) as dead:
        await leaky.verify(token, "slow_alpha")
    assert dead.value.reason == "revoked"


async def test_the_end_of_the_invocation_revokes_a_call_still_in_flight(leaky: Leaky) -> None:
    call = asyncio.create_task(leaky.call("slow_alpha"))
    await asyncio.wait_for(leaky.verified.arrived.wait(), 10)
    leaky.tokens.close()  # the invocation ends (say, its caller went away) mid-call
    await leaky.revoked_in_redis()
    leaky.verified.release.set()
    outcome = await call
    assert outcome.error_code == TOOL_ERROR and "revoked" in outcome.error
    # The agent's own token, minted with the invocation, went with it.
    with pytest.raises(InvalidInvocationToken) as agent:
        await leaky.verify(leaky.tokens.agent.token, "agents/agent/versions/3")
    assert agent.value.reason == "revoked"
