"""Credentials, tools and streamed model calls through the whole platform: an agent in a bwrap
sandbox calls a real HTTP tool service that verifies the invocation token through the executor's
JWKS; the token dies with its invocation; undeclared tools are refused; secrets never reach the
sandbox; tool failures are the agent's errors and count against its version."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from aiohttp import web
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from corral.executor.v1 import executor_pb2 as ex
from corral.registry.v1 import tools_pb2, tools_pb2_grpc
from corral.router.v1 import router_pb2 as rt
from corral.telemetry.v1 import telemetry_pb2 as tel
from corral.verify import InvalidInvocationToken, InvocationClaims, averify_invocation_token
from services.common import tracing
from services.common.settings import Settings
from tests import harness
from tests.credentials import public_channel
from tests.mesh import Mesh, connect
from tests.rpc import error_details, fails

pytestmark = [
    pytest.mark.integration, pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
]
SECRET = "s3cr3t-" + base64.b16encode(os.urandom(6)).decode()

AGENT = """
import json, os
from corral.sdk import App, ToolError

app = App()


def secret_anywhere(secret):
    hits = [k for k, v in os.environ.items() if secret in v]
    paths = ["/proc/self/environ", "/proc/self/cmdline", "/proc/1/environ", "/proc/1/cmdline"]
    for root in ("/tmp", "/bundle"):
        for dirpath, _, files in os.walk(root):
            paths += [os.path.join(dirpath, f) for f in files]
    for path in paths:
        try:
            with open(path, "rb") as f:
                if secret.encode() in f.read(1 << 20):
                    hits.append(path)
        except OSError:
            pass
    return hits


@app.entrypoint
def run(payload, ctx):
    mode = payload["mode"]
    if mode == "call":
        yield json.dumps({"answer": ctx.tools.call("session_data", {"client": "c-1"}),
                          "token": ctx.credentials})
    elif mode == "undeclared":
        try:
            ctx.tools.call("billing", {})
        except ToolError as exc:
            yield json.dumps({"code": exc.code, "message": str(exc)})
    elif mode == "fail":
        try:
            ctx.tools.call("session_data", {"fail": payload["how"]}, timeout_s=1)
        except ToolError as exc:
            yield json.dumps({"code": exc.code})
    elif mode == "secret":
        yield json.dumps({"hits": secret_anywhere(payload["secret"])})
    elif mode == "stream":
        for piece in ctx.model.stream("the client reported better sleep and less anxiety"):
            yield piece
    elif mode == "partial":
        for piece in ctx.model.stream("the client reported better sleep and less anxiety"):
            break  # stops reading early: the next call must still get its own answer
        yield json.dumps({"first": piece, "then": ctx.model.complete("second question asked")})
"""
TOOLS = '\n[[tools]]\nname = "session_data"\n'


class ToolService:
    """A session-data tool that trusts nothing but a valid invocation token for itself."""

    def __init__(self, jwks_url: str) -> None:
        self.jwks_url = jwks_url
        self.calls: list[dict[str, str]] = []
        self.claims: list[InvocationClaims] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            claims = await averify_invocation_token(token, audience="session_data", jwks_url=self.jwks_url)
        except InvalidInvocationToken as exc:
            return web.json_response({"refused": exc.reason}, status=401)
        if claims.invocation_id != request.headers.get("X-Corral-Invocation"):
            return web.json_response({"refused": "token of another invocation"}, status=401)
        body = await request.json()
        self.calls.append({"secret": request.headers.get("X-Corral-Tool-Secret", ""),
                           "tenant": claims.tenant, "session": claims.session, "token": token})
        self.claims.append(claims)
        if body.get("fail") == "500":
            return web.json_response({"error": "database down"}, status=500)
        if body.get("fail") == "slow":
            await asyncio.sleep(3)
        return web.json_response({"client": body.get("client"), "sessions": 12, "tenant": claims.tenant})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/session-data", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]
        return f"http://127.0.0.1:{self.port}/session-data"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest_asyncio.fixture
async def world(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[Mesh, ToolService, str]]:
    http = harness.held_port()  # the executor's HTTP port: the tool fetches its JWKS there
    key = base64.b64encode(os.urandom(32)).decode()
    s = harness.with_tracing(harness.make_settings(
        settings.database_url or "", settings.redis_url or "", tmp_path,
        CORRAL_EXECUTOR_HTTP_PORT=str(http.port), CORRAL_SECRETS_KEY=key))
    platform = harness.Platform(s)
    tool = ToolService(f"http://127.0.0.1:{http.port}/.well-known/jwks.json")
    try:
        await platform.start(*harness.MESH)
        address = await tool.start()
        async with connect(platform.settings, platform.hosts, tmp_path) as mesh:
            stub = tools_pb2_grpc.ToolServiceStub(public_channel(platform.settings.addrs["registry"]))
            await stub.CreateTool(tools_pb2.CreateToolRequest(tool_id="session_data", tool=tools_pb2.Tool(
                kind=tools_pb2.TOOL_KIND_HTTP, address=address, secret=SECRET)), metadata=mesh.me)
            agent = await mesh.publish_agent("broker", AGENT, toml_extra=TOOLS)
            yield mesh, tool, agent
    finally:
        http.close()
        await tool.stop()
        await platform.stop()


async def invoke(mesh: Mesh, agent: str, payload: dict, session: str = "") -> dict:
    reply = await mesh.invoke(agent, payload, session_id=session) if session else \
        await mesh.invoke(agent, payload)
    return json.loads(reply.output)  # type: ignore[no-any-return]


async def test_a_tool_verifies_the_invocation_token_and_gets_the_secret(world) -> None:
    mesh, tool, agent = world
    result = await invoke(mesh, agent, {"mode": "call"})
    assert result["answer"] == {"client": "c-1", "sessions": 12, "tenant": mesh.tenant}
    assert tool.calls[-1]["secret"] == SECRET and tool.calls[-1]["tenant"] == mesh.tenant

    # The tool got a token of its own: this tool its only audience, alive no longer than the
    # call (the tool's timeout, 30 s by default), not the agent's.
    token = result["token"]
    assert token.count(".") == 2
    seen, claims = tool.calls[-1]["token"], tool.claims[-1]
    assert seen != token and claims.audience == ("session_data",)
    assert claims.expires_at <= time.time() + 30

    async def replay(bearer: str) -> str:
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"http://127.0.0.1:{tool.port}/session-data", json={"client": "x"},
                                     headers={"Authorization": f"Bearer {bearer}"})
        assert answer.status_code == 401
        return str(answer.json()["refused"])

    # The call is over, so is its token; the agent's own was never for a tool.
    assert await replay(seen) == "revoked"
    assert await replay(token) == "wrong audience"

    # The JWKS over gRPC is the same key set as over HTTP.
    jwks = await mesh.executor.GetJwks(ex.GetJwksRequest())
    async with httpx.AsyncClient() as http:
        served = (await http.get(tool.jwks_url)).json()
    assert {k.kid for k in jwks.keys} == {k["kid"] for k in served["keys"]} and jwks.keys
    claims_jti = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["jti"]
    assert (await mesh.executor.CheckRevocation(ex.CheckRevocationRequest(jti=claims_jti))).revoked
    err = await fails(grpc.StatusCode.INVALID_ARGUMENT,
                      mesh.executor.CheckRevocation(ex.CheckRevocationRequest(jti="x" * 100_000)))
    assert error_details(err)[1] == ["jti"] and len(err.details() or "") < 300


async def test_undeclared_tools_are_refused_and_secrets_never_enter_the_sandbox(world) -> None:
    mesh, tool, agent = world
    before = len(tool.calls)
    refused = await invoke(mesh, agent, {"mode": "undeclared"})
    assert refused["code"] == "PERMISSION_DENIED" and "billing" in refused["message"]
    assert len(tool.calls) == before
    await invoke(mesh, agent, {"mode": "call"}, session=f"{mesh.prefix}-s")
    found = await invoke(mesh, agent, {"mode": "secret", "secret": SECRET}, session=f"{mesh.prefix}-s")
    assert found == {"hits": []}


async def test_tool_failures_are_the_agents_errors_and_count_for_its_version(world) -> None:
    mesh, _, agent = world
    # The executor's own spans go through OpenTelemetry's global tracer provider, which only one
    # in-process test may install (test_mesh_invocation's); this one exports the tool broker's
    # spans to this test's telemetry with a provider of its own, as the executor's would.
    provider = TracerProvider(resource=Resource.create({"service.name": "corral-executor"}))
    provider.add_span_processor(BatchSpanProcessor(
        tracing.span_exporter(mesh.settings, "executor")))
    executor = mesh.hosts["executor"].service.executor  # type: ignore[attr-defined]
    executor.tools.tracer = provider.get_tracer("test")
    try:
        assert (await invoke(mesh, agent, {"mode": "fail", "how": "500"}))["code"] == "TOOL_ERROR"
        assert (await invoke(mesh, agent, {"mode": "fail", "how": "slow"}))["code"] == "TIMEOUT"
        await invoke(mesh, agent, {"mode": "call"})
    finally:
        # Off the event loop: the export goes to a telemetry server running on this loop.
        await asyncio.to_thread(provider.shutdown)
    version = f"agents/{agent}/versions/1"
    async with asyncio.timeout(20):
        while True:
            metrics = await mesh.telemetry.GetVersionMetrics(
                tel.GetVersionMetricsRequest(agent=f"agents/{agent}"), metadata=mesh.me)
            mine = [m for m in metrics.versions if m.version == version]
            if mine and mine[0].tool_calls >= 3:
                break
            await asyncio.sleep(0.2)
    assert (mine[0].tool_calls, mine[0].tool_failures) == (3, 2)
    assert abs(mine[0].tool_failure_rate - 2 / 3) < 1e-9


async def test_a_streamed_model_answer_arrives_in_pieces(world) -> None:
    mesh, _, agent = world
    chunks = [
        r.chunk.data async for r in mesh.router.InvokeStream(rt.InvokeRequest(
            agent=f"agents/{agent}", payload=json.dumps({"mode": "stream"}).encode()), metadata=mesh.me)
        if r.HasField("chunk")
    ]
    whole = await mesh.invoke(agent, {"mode": "stream"})
    assert len(chunks) > 2 and b"".join(chunks) == whole.output
    assert b"key points" in whole.output
    partial = json.loads((await mesh.invoke(agent, {"mode": "partial"})).output)
    assert whole.output.decode().startswith(partial["first"])
    assert partial["then"] == "[scripted-1] 3 words; key points: second, question, asked."
