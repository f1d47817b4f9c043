"""The outbound policy where tools meet it: CreateTool and UpdateTool refuse forbidden addresses
naming the field, a call dials exactly the address it checked (under the tool's own name, TLS
verified against that name), a refused one is never connected to, and a redirect is an answer,
never followed."""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from aiohttp import web

from corral.registry.v1 import tools_pb2 as pb
from corral.tools.v1 import tools_pb2 as tool_api
from corral.tools.v1 import tools_pb2_grpc as tool_api_grpc
from services.common.auth.pki import ensure_pki
from services.common.outbound import LOOPBACK, OutboundPolicy
from services.common.outbound_http import PinnedTransport
from services.executor.clients import RegistryToolResolver
from services.executor.model import PERMISSION_DENIED, TOOL_ERROR, ToolOutcome
from services.executor.tool_transport import ToolTransport
from services.executor.tools import ToolBroker
from tests.fakes.common import FakeResolver
from tests.fakes.executor import FixedTokens
from tests.rpc import error_details, fails
from tests.tool_registry import TOKEN, Registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.mark.parametrize(("kind", "address", "says"), [
    (pb.TOOL_KIND_HTTP, "http://169.254.169.254/latest/meta-data", "link-local"),
    (pb.TOOL_KIND_HTTP, "http://2852039166/", "169.254.169.254, a link-local"),
    (pb.TOOL_KIND_HTTP, "http://[::ffff:169.254.169.254]/", "169.254.169.254, a link-local"),
    (pb.TOOL_KIND_HTTP, "http://good@169.254.169.254/", "user:password@"),
    (pb.TOOL_KIND_HTTP, "http://0.0.0.0:8080/", "unspecified"),
    (pb.TOOL_KIND_HTTP, "http://10.0.0.7/", "private"),
    (pb.TOOL_KIND_GRPC, "ipv4:169.254.169.254:82", "'ipv4:' is not supported"),
    (pb.TOOL_KIND_GRPC, "dns://8.8.8.8/tools.example:50051", "'dns:' is not supported"),
    (pb.TOOL_KIND_GRPC, "unix:/var/run/docker.sock", "'unix:' is not supported"),
    (pb.TOOL_KIND_GRPC, "[::ffff:169.254.169.254]:82", "link-local"),
    (pb.TOOL_KIND_GRPC, "[::]:50051", "unspecified"),
])
async def test_create_and_update_refuse_forbidden_addresses_naming_the_field(
    registry: Registry, kind: int, address: str, says: str
) -> None:
    err = await fails(grpc.StatusCode.INVALID_ARGUMENT, registry.create("probe", kind=kind, address=address))
    details = err.details() or ""
    assert details.startswith("tool.address: ") and says in details, details
    assert error_details(err)[1] == ["tool.address"]
    await registry.create("probe", kind=kind, address="good.example:50051"
                          if kind == pb.TOOL_KIND_GRPC else "https://good.example/")
    err = await fails(grpc.StatusCode.INVALID_ARGUMENT, registry.tools.UpdateTool(
        pb.UpdateToolRequest(tool=pb.Tool(name="tools/probe", address=address)), metadata=registry.md))
    assert error_details(err)[1] == ["tool.address"] and says in (err.details() or "")
    listed = await registry.tools.ListTools(pb.ListToolsRequest(), metadata=registry.md)
    assert [t.address for t in listed.tools] == [
        "good.example:50051" if kind == pb.TOOL_KIND_GRPC else "https://good.example/"]


@dataclass
class Listener:
    """A loopback HTTP server that records what reaches it."""

    hits: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    redirect_to: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append((request.path, request.headers.get("Host", "")))
        if self.redirect_to:
            raise web.HTTPTemporaryRedirect(self.redirect_to)
        return web.json_response({"ok": True})


class _Pong(tool_api_grpc.ToolServiceServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def Invoke(
        self, request: tool_api.InvokeRequest,
        context: grpc.aio.ServicerContext[tool_api.InvokeRequest, tool_api.InvokeResponse],
    ) -> tool_api.InvokeResponse:
        self.calls += 1
        return tool_api.InvokeResponse(payload=b"pong", content_type="text/plain")


@dataclass
class World:
    registry: Registry
    target: Listener
    redirector: Listener
    pong: _Pong
    grpc_port: int


@pytest_asyncio.fixture
async def world(registry: Registry) -> AsyncIterator[World]:
    target, redirector = Listener(), Listener()
    runners = []
    for listener in (target, redirector):
        app = web.Application()
        app.add_routes([web.post("/{tail:.*}", listener.handle)])
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        listener.port = runner.addresses[0][1]
        runners.append(runner)
    redirector.redirect_to = f"http://127.0.0.1:{target.port}/stolen"
    pong = _Pong()
    server = grpc.aio.server()
    tool_api_grpc.add_ToolServiceServicer_to_server(pong, server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield World(registry, target, redirector, pong, grpc_port)
    finally:
        await server.stop(None)
        for runner in runners:
            await runner.cleanup()


async def _call(w: World, tool: str, names: dict[str, list[str]], allow: bool) -> ToolOutcome:
    """Calls `tool` through an executor whose DNS answers `names`, loopback allowed or not."""
    policy = OutboundPolicy(LOOPBACK if allow else (), resolver=FakeResolver(names))
    settings = w.registry.settings.for_service("executor")
    broker = ToolBroker(resolver=RegistryToolResolver(settings),
                        transport=ToolTransport(settings.executor.max_payload_bytes, policy))
    try:
        return await broker.call(
            tenant=w.registry.tenant, tool=tool, allowed=(tool,), tokens=FixedTokens(TOKEN),
            payload=b"{}", content_type="application/json", timeout_s=None,
            deadline=time.time() + 10, attributes={}, context=None)
    finally:
        await broker.close()


async def test_a_call_dials_the_address_it_checked_under_the_tools_own_name(world: World) -> None:
    """`tool.test` and `rpc.test` exist only in the executor's (fake) DNS: the calls reach the
    loopback servers only because the transport dials the address the policy checked."""
    r = world.registry
    await r.create("named", address=f"http://tool.test:{world.target.port}/named")
    await r.create("named_rpc", kind=pb.TOOL_KIND_GRPC, address=f"dns:///rpc.test:{world.grpc_port}")
    names = {"tool.test": ["127.0.0.1"], "rpc.test": ["127.0.0.1"]}
    outcome = await _call(world, "named", names, allow=True)
    assert outcome.error_code == "", outcome.error
    assert world.target.hits == [("/named", f"tool.test:{world.target.port}")]
    outcome = await _call(world, "named_rpc", names, allow=True)
    assert (outcome.error_code, outcome.payload) == ("", b"pong")


async def test_a_name_resolving_to_a_refused_address_is_never_connected_to(world: World) -> None:
    r = world.registry
    await r.create("rebound", address=f"http://tool.test:{world.target.port}/rebound")
    await r.create("rebound_rpc", kind=pb.TOOL_KIND_GRPC, address=f"rpc.test:{world.grpc_port}")
    # One good address and one bad one is refused as a whole.
    names = {"tool.test": ["93.184.216.34", "127.0.0.1"], "rpc.test": ["::ffff:127.0.0.1"]}
    for tool in ("rebound", "rebound_rpc"):
        outcome = await _call(world, tool, names, allow=False)
        assert outcome.error_code == PERMISSION_DENIED, outcome
        assert "127.0.0.1, a loopback address" in outcome.error
    unresolved = await _call(world, "rebound", {}, allow=True)  # DNS failing: closed, not open
    assert "does not resolve" in unresolved.error
    assert world.target.hits == [] and world.pong.calls == 0


async def test_a_redirect_is_the_tools_answer_and_is_not_followed(world: World) -> None:
    await world.registry.create("hop", address=f"http://127.0.0.1:{world.redirector.port}/hop")
    outcome = await _call(world, "hop", {}, allow=True)
    assert outcome.error_code == TOOL_ERROR and "HTTP 307" in outcome.error, outcome
    assert len(world.redirector.hits) == 1 and world.target.hits == []


async def test_tls_is_verified_against_the_name_while_dialling_the_checked_address(
    tmp_path: Path,
) -> None:
    """The server's certificate names tool.test only (no IP address): the pinned call to
    127.0.0.1 succeeds because SNI and verification use the name; other.test, resolving to the
    same address, fails verification rather than riding tool.test's pooled connection."""
    ensure_pki(tmp_path, ["tool"], hosts=("tool.test",))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tmp_path / "tool.crt", tmp_path / "tool.key")
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Host", ""))
        return web.json_response({"ok": True})

    app = web.Application()
    app.add_routes([web.get("/", handle)])
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls).start()
    port = runner.addresses[0][1]
    client_tls = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    names = FakeResolver({"tool.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    transport = PinnedTransport(OutboundPolicy(LOOPBACK, resolver=names), verify=client_tls)
    try:
        async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
            answer = await client.get(f"https://tool.test:{port}/")
            assert answer.json() == {"ok": True}
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED|match"):
                await client.get(f"https://other.test:{port}/")
    finally:
        await runner.cleanup()
    assert seen == [f"tool.test:{port}"]
