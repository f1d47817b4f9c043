"""The executor's ToolBroker calling real HTTP and gRPC tools registered in a real registry:
what a tool receives, permissions, timeouts, failures, spans, and secrets kept from agents."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from aiohttp import web
from google.protobuf import field_mask_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from corral.names import ToolRef
from corral.registry.v1 import tools_pb2 as pb
from corral.tools.v1 import tools_pb2 as tool_api
from corral.tools.v1 import tools_pb2_grpc as tool_api_grpc
from services.common.endpoints import EndpointMirror, EndpointUpdate
from services.common.outbound import OutboundPolicy, SystemResolver
from services.executor.clients import RegistryClient, RegistryToolResolver
from services.executor.model import (
    NOT_FOUND,
    PERMISSION_DENIED,
    TIMEOUT,
    TOOL_ERROR,
    UNAVAILABLE,
    ResolvedTool,
    ToolOutcome,
)
from services.executor.tool_transport import ToolTransport
from services.executor.tools import TOOL_ATTR, ToolBroker
from tests import harness
from tests.fakes.common import FakeResolver
from tests.fakes.executor import FixedTokens
from tests.tool_registry import SECRET, TOKEN, Registry, seconds

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
REBOUND = {"metadata.test": ["169.254.169.254"]}


# -- the broker against real tools -------------------------------------------------------------


@dataclass
class Seen:
    """What the test tools received."""

    requests: list[tuple[Mapping[str, str], bytes]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)


async def _http_tool(seen: Seen) -> tuple[web.AppRunner, int]:
    async def ok(request: web.Request) -> web.Response:
        seen.requests.append((dict(request.headers), await request.read()))
        return web.json_response({"answer": 42})

    async def slow(request: web.Request) -> web.Response:
        seen.requests.append((dict(request.headers), await request.read()))
        try:
            await asyncio.wait_for(seen.release.wait(), 10)
        except TimeoutError:
            pass
        return web.json_response({})

    async def broken(request: web.Request) -> web.Response:
        seen.requests.append((dict(request.headers), await request.read()))
        # A careless tool that echoes what it was sent: the broker must not pass it on.
        secret = request.headers.get("X-Corral-Tool-Secret", "")
        return web.Response(status=500, text=f"database down (key {secret}, auth "
                                             f"{request.headers.get('Authorization')})")

    async def echo(request: web.Request) -> web.Response:
        seen.requests.append((dict(request.headers), await request.read()))
        return web.json_response({"headers": dict(request.headers)})  # a debugging tool, 200

    app = web.Application()
    app.add_routes([web.post("/ok", ok), web.post("/slow", slow), web.post("/broken", broken),
                    web.post("/echo", echo)])
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


class _GrpcTool(tool_api_grpc.ToolServiceServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def Invoke(
        self, request: tool_api.InvokeRequest, context: grpc.aio.ServicerContext
    ) -> tool_api.InvokeResponse:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.seen.requests.append((metadata, request.payload))
        if request.payload == b"fail":
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"exploded with {metadata.get('x-corral-tool-secret')}")
        if request.payload == b"slow":
            try:
                await asyncio.wait_for(self.seen.release.wait(), 10)
            except TimeoutError:
                pass
        return tool_api.InvokeResponse(payload=b"pong:" + request.payload, content_type="text/plain")


class CountingResolver:
    """The real resolver, counting the registry round trips."""

    def __init__(self, inner: RegistryToolResolver) -> None:
        self.inner = inner
        self.calls = 0

    async def resolve(self, tenant: str, tool: str, timeout_s: float) -> ResolvedTool | None:
        self.calls += 1
        return await self.inner.resolve(tenant, tool, timeout_s)

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Tools:
    registry: Registry
    broker: ToolBroker
    resolver: CountingResolver
    exporter: InMemorySpanExporter
    http: Seen
    grpc: Seen
    tokens: FixedTokens = field(default_factory=lambda: FixedTokens(TOKEN))

    async def call(self, tool: str, payload: bytes = b'{"q": 1}', *, allowed: tuple[str, ...] | None = None,
                   timeout_s: float | None = None, deadline_in: float = 30.0) -> ToolOutcome:
        return await self.broker.call(
            tenant=self.registry.tenant, tool=tool, allowed=allowed if allowed is not None else (tool,),
            tokens=self.tokens, payload=payload, content_type="application/json", timeout_s=timeout_s,
            deadline=time.time() + deadline_in,
            attributes={"corral.invocation": "inv-123", "corral.version": "agents/a/versions/1"},
            context=None,
        )

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


@pytest_asyncio.fixture
async def tools(registry: Registry) -> AsyncIterator[Tools]:
    http_seen, grpc_seen = Seen(), Seen()
    runner, http_port = await _http_tool(http_seen)
    server = grpc.aio.server()
    tool_api_grpc.add_ToolServiceServicer_to_server(_GrpcTool(grpc_seen), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    base = f"http://127.0.0.1:{http_port}"
    await registry.create("web", SECRET, address=f"{base}/ok")
    await registry.create("slow_web", address=f"{base}/slow")
    await registry.create("impatient", address=f"{base}/slow", timeout=seconds(0.2))
    await registry.create("broken", SECRET, address=f"{base}/broken")
    await registry.create("echo", SECRET, address=f"{base}/echo")
    # Not resolvable when it is registered; by the time it is called, it resolves to the cloud
    # metadata address (as a rebinding DNS server would answer).
    await registry.create("metadata", address="http://metadata.test/latest/meta-data")
    await registry.create("refused", address=f"http://{harness.refused_address()}/x")
    await registry.create("rpc", SECRET, kind=pb.TOOL_KIND_GRPC, address=f"127.0.0.1:{grpc_port}")
    await registry.create("rpc_refused", kind=pb.TOOL_KIND_GRPC, address=harness.refused_address())
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    resolver = CountingResolver(RegistryToolResolver(registry.settings.for_service("executor")))
    transport = ToolTransport(registry.settings.executor.max_payload_bytes, OutboundPolicy(
        registry.settings.outbound_allow, resolver=FakeResolver(REBOUND, fallback=SystemResolver())))
    broker = ToolBroker(resolver=resolver, transport=transport, tracer=provider.get_tracer("test"))
    try:
        yield Tools(registry, broker, resolver, exporter, http_seen, grpc_seen)
    finally:
        http_seen.release.set()
        grpc_seen.release.set()
        await broker.close()
        await server.stop(0)
        await runner.cleanup()
        provider.shutdown()


async def test_an_http_tool_gets_the_payload_token_secret_and_invocation(tools: Tools) -> None:
    outcome = await tools.call("web")
    assert outcome.error_code == "" and json.loads(outcome.payload) == {"answer": 42}
    assert outcome.content_type.startswith("application/json")
    [(headers, body)] = tools.http.requests
    assert body == b'{"q": 1}'
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["X-Corral-Tool-Secret"] == SECRET
    assert headers["X-Corral-Invocation"] == "inv-123"
    assert headers["Content-Type"] == "application/json"
    assert "traceparent" in headers
    # Resolved once, then cached.
    await tools.call("web")
    assert tools.resolver.calls == 1


async def test_a_grpc_tool_gets_the_invoke_contract_with_metadata(tools: Tools) -> None:
    outcome = await tools.call("rpc", b"ping")
    assert (outcome.payload, outcome.content_type, outcome.error_code) == (b"pong:ping", "text/plain", "")
    [(metadata, payload)] = tools.grpc.requests
    assert payload == b"ping"
    assert metadata["authorization"] == f"Bearer {TOKEN}"
    assert metadata["x-corral-tool-secret"] == SECRET
    assert metadata["x-corral-invocation"] == "inv-123"


async def test_an_undeclared_tool_is_denied_without_any_request(tools: Tools) -> None:
    outcome = await tools.call("web", allowed=("lookup",))
    assert outcome.error_code == PERMISSION_DENIED and "agent.toml" in outcome.error
    outcome = await tools.call("rpc", allowed=())
    assert outcome.error_code == PERMISSION_DENIED
    assert tools.http.requests == [] and tools.grpc.requests == []
    assert tools.resolver.calls == 0, "not even the registry is asked"


async def test_an_unregistered_tool_is_not_found(tools: Tools) -> None:
    outcome = await tools.call("nowhere")
    assert outcome.error_code == NOT_FOUND and "corral tools create nowhere" in outcome.error


async def test_the_shortest_of_the_three_timeouts_applies(tools: Tools) -> None:
    by_call = await tools.call("slow_web", timeout_s=0.2)
    assert by_call.error_code == TIMEOUT and "the call's timeout" in by_call.error
    by_tool = await tools.call("impatient", timeout_s=30)
    assert by_tool.error_code == TIMEOUT and "the tool's timeout" in by_tool.error
    by_deadline = await tools.call("slow_web", deadline_in=0.2)
    assert by_deadline.error_code == TIMEOUT and "deadline" in by_deadline.error
    by_rpc = await tools.call("rpc", b"slow", timeout_s=0.2)
    assert by_rpc.error_code == TIMEOUT
    sent = len(tools.http.requests)
    past = await tools.call("web", deadline_in=-1)
    assert past.error_code == TIMEOUT and len(tools.http.requests) == sent, "nothing sent after the deadline"


async def test_tool_failures_are_tool_errors_without_the_secret(tools: Tools) -> None:
    http = await tools.call("broken")
    assert http.error_code == TOOL_ERROR and "HTTP 500" in http.error and "database down" in http.error
    assert SECRET not in http.error and TOKEN not in http.error
    rpc = await tools.call("rpc", b"fail")
    assert rpc.error_code == TOOL_ERROR and "INTERNAL" in rpc.error and SECRET not in rpc.error


async def test_a_refused_connection_is_unavailable(tools: Tools) -> None:
    assert (await tools.call("refused")).error_code == UNAVAILABLE
    assert (await tools.call("rpc_refused")).error_code == UNAVAILABLE


async def test_each_call_is_a_span_telemetry_can_count(
    tools: Tools, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await tools.call("web")
    await tools.call("broken")
    await tools.call("web", allowed=())
    spans = {(s.name, s.status.status_code): s for s in tools.spans()}
    ok = spans[("execute_tool web", StatusCode.UNSET)]
    attrs = dict(ok.attributes or {})
    assert attrs["gen_ai.operation.name"] == "execute_tool"
    assert attrs["gen_ai.tool.name"] == "web" and attrs[TOOL_ATTR] == "web"
    assert attrs["corral.invocation"] == "inv-123" and attrs["corral.version"] == "agents/a/versions/1"
    assert "error.type" not in attrs
    failed = spans[("execute_tool broken", StatusCode.ERROR)]
    assert dict(failed.attributes or {})["error.type"] == TOOL_ERROR
    denied = spans[("execute_tool web", StatusCode.ERROR)]
    assert dict(denied.attributes or {})["error.type"] == PERMISSION_DENIED
    for span in tools.spans():
        text = span.to_json()
        assert SECRET not in text and TOKEN not in text
    assert not [r for r in caplog.records if SECRET in r.getMessage() or TOKEN in r.getMessage()]


async def test_a_tool_that_echoes_its_secret_does_not_pass_it_to_the_agent(tools: Tools) -> None:
    outcome = await tools.call("echo")
    assert outcome.error_code == "" and SECRET.encode() not in outcome.payload
    assert json.loads(outcome.payload)["headers"]["X-Corral-Tool-Secret"] == "[redacted]"


async def test_link_local_and_unallowed_loopback_addresses_are_refused(
    tools: Tools, registry: Registry
) -> None:
    outcome = await tools.call("metadata")
    assert outcome.error_code == PERMISSION_DENIED and "169.254.169.254" in outcome.error
    strict = ToolBroker(resolver=tools.resolver, transport=ToolTransport.from_settings(
        dataclasses.replace(registry.settings, outbound_allow=())))
    try:
        for tool in ("web", "rpc"):
            outcome = await strict.call(
                tenant=registry.tenant, tool=tool, allowed=(tool,), tokens=FixedTokens(TOKEN),
                payload=b"{}", content_type="application/json", timeout_s=None,
                deadline=time.time() + 10, attributes={}, context=None)
            assert outcome.error_code == PERMISSION_DENIED, outcome
            assert "127.0.0.1, a loopback address" in outcome.error
            assert "CORRAL_OUTBOUND_ALLOW" in outcome.error
    finally:
        await strict.close()
    # The loopback listeners were never connected to: nothing reached either tool.
    assert tools.http.requests == [] and tools.grpc.requests == []


async def _moved(tools: Tools, tool: str, address: str) -> None:
    """`tool` moved to `address` (with its secret: a secret never follows a tool elsewhere)."""
    await tools.registry.tools.UpdateTool(pb.UpdateToolRequest(
        tool=pb.Tool(name=f"tools/{tool}", address=address, secret=SECRET),
        update_mask=field_mask_pb2.FieldMask(paths=["address", "secret"]),
    ), metadata=tools.registry.md)


async def test_a_moved_tool_is_called_at_its_new_address_within_the_cache_bound(
    registry: Registry,
) -> None:
    seen = Seen()
    runner, port = await _http_tool(seen)
    await registry.create("moving", SECRET, address=f"http://127.0.0.1:{port}/ok")
    later = [0.0]  # how far the broker's clock is ahead of the wall clock
    resolver = CountingResolver(RegistryToolResolver(registry.settings.for_service("executor")))
    broker = ToolBroker(
        resolver=resolver, transport=ToolTransport.from_settings(registry.settings),
        clock=lambda: time.time() + later[0], cache_ttl_s=registry.settings.credential_cache_s,
    )
    tools = Tools(registry, broker, resolver, InMemorySpanExporter(), seen, Seen())
    try:
        assert json.loads((await tools.call("moving")).payload) == {"answer": 42}
        await _moved(tools, "moving", f"http://127.0.0.1:{port}/echo")
        later[0] = registry.settings.credential_cache_s  # the documented bound: 5 s by default
        moved = await tools.call("moving")
        assert moved.error_code == "" and "headers" in json.loads(moved.payload)

        # Moved away from an address that no longer answers: the call that finds it gone makes
        # the next one ask the registry again, however fresh the cached address was.
        await _moved(tools, "moving", f"http://{harness.refused_address()}/gone")
        later[0] += registry.settings.credential_cache_s
        assert (await tools.call("moving")).error_code == UNAVAILABLE
        await _moved(tools, "moving", f"http://127.0.0.1:{port}/ok")
        assert json.loads((await tools.call("moving")).payload) == {"answer": 42}
    finally:
        await broker.close()
        await runner.cleanup()


async def test_a_moved_tool_is_called_at_its_new_address_at_the_next_call(
    registry: Registry,
) -> None:
    """The registry's endpoint watch tells the executor of a changed tool: its next call, however
    fresh the cached address, goes to the new one (the cache bound only covers lost news)."""
    seen = Seen()
    runner, port = await _http_tool(seen)
    await registry.create("pushed", SECRET, address=f"http://127.0.0.1:{port}/ok")
    resolver = CountingResolver(RegistryToolResolver(registry.settings.for_service("executor")))
    broker = ToolBroker(resolver=resolver, transport=ToolTransport.from_settings(registry.settings),
                        cache_ttl_s=3600.0)
    heard: asyncio.Queue[EndpointUpdate] = asyncio.Queue()

    async def invalidated(update: EndpointUpdate) -> None:
        broker.forget_all() if update.snapshot else broker.forget(update.changed_tools)
        await heard.put(update)

    watcher = RegistryClient(registry.settings.for_service("executor"))
    mirror = EndpointMirror(watcher.endpoints(), on_invalidated=invalidated)
    mirror.start()
    tools = Tools(registry, broker, resolver, InMemorySpanExporter(), seen, Seen())
    try:
        async with asyncio.timeout(10):
            assert (await heard.get()).snapshot
        assert json.loads((await tools.call("pushed")).payload) == {"answer": 42}
        await _moved(tools, "pushed", f"http://127.0.0.1:{port}/echo")
        async with asyncio.timeout(10):
            while (registry.tenant, ToolRef("pushed")) not in (await heard.get()).changed_tools:
                pass
        moved = await tools.call("pushed")
        assert moved.error_code == "" and "headers" in json.loads(moved.payload)
        assert resolver.calls == 2
    finally:
        await mirror.close()
        await watcher.close()
        await broker.close()
        await runner.cleanup()


def documented_headers() -> list[str]:
    """The headers README.md's tool contract says every HTTP tool receives."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    contract = readme.split("#### The tool contract", 1)[1].split("\n####", 1)[0]
    return re.findall(r"^  \| `([A-Za-z-]+)` \|", contract, re.MULTILINE)


async def test_a_tool_receives_what_the_readme_documents(tools: Tools) -> None:
    documented = documented_headers()
    assert documented == ["Content-Type", "Authorization", "X-Corral-Tool-Secret",
                          "X-Corral-Invocation", "traceparent"]
    await tools.call("web")
    await tools.call("rpc", b"ping")
    [(headers, _)] = tools.http.requests
    [(metadata, _)] = tools.grpc.requests
    assert [h for h in documented if h not in headers] == []
    # gRPC carries the same values as metadata, but for Content-Type (a field of the request).
    assert [h.lower() for h in documented[1:] if h.lower() not in metadata] == []
