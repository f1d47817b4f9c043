"""Tools as a tenant and an agent see them: a real registry on real PostgreSQL storing tools per
tenant with their secrets sealed, and the executor's ToolBroker calling real HTTP and gRPC tools."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from aiohttp import web
from click.testing import CliRunner
from google.protobuf import duration_pb2, field_mask_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from corral.cli import State
from corral.cli.tools import tools as tools_cli
from corral.registry.v1 import registry_pb2, registry_pb2_grpc, tools_pb2_grpc
from corral.registry.v1 import tools_pb2 as pb
from corral.tools.v1 import tools_pb2 as tool_api
from corral.tools.v1 import tools_pb2_grpc as tool_api_grpc
from services.common.settings import Settings
from services.executor.clients import RegistryToolResolver
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
from services.registry.secrets import SecretBox, SecretError
from tests import harness
from tests.rpc import Metadata, error_details, fails, new_tenant, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SECRET = "sk-test-" + "7f3a9c" * 4
TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl"
KEY = os.urandom(32)


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


@dataclass
class Registry:
    settings: Settings
    tools: tools_pb2_grpc.ToolServiceAsyncStub
    secrets: tools_pb2_grpc.ToolSecretsServiceAsyncStub
    audit: registry_pb2_grpc.RegistryServiceAsyncStub
    tenant: str
    md: Metadata = ()

    @property
    def internal(self) -> Metadata:
        """What an executor presents to ResolveTool."""
        return (("x-corral-internal-token", self.settings.internal_token),)

    async def create(self, tool_id: str, secret: str = "", **fields: Any) -> pb.Tool:
        tool = pb.Tool(secret=secret, **{"kind": pb.TOOL_KIND_HTTP, **fields})
        return await self.tools.CreateTool(
            pb.CreateToolRequest(tool_id=tool_id, tool=tool), metadata=self.md
        )


@pytest_asyncio.fixture
async def registry(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Registry]:
    """A registry with a secrets key; a tenant of its own keeps each test apart."""
    settings = harness.make_settings(
        database_url, redis_url, tmp_path, CORRAL_SECRETS_KEY=base64.b64encode(KEY).decode()
    )
    platform = await harness.start_mesh(settings, "registry")
    try:
        async with grpc.aio.insecure_channel(platform.settings.addrs["registry"]) as channel:
            tenant = new_tenant()
            yield Registry(
                platform.settings,
                tools_pb2_grpc.ToolServiceStub(channel),
                tools_pb2_grpc.ToolSecretsServiceStub(channel),
                registry_pb2_grpc.RegistryServiceStub(channel),
                tenant,
                who(tenant),
            )
    finally:
        await platform.stop()


# -- the registry: CRUD, validation, tenants, secrets ------------------------------------------


async def test_create_get_list_update_delete(registry: Registry) -> None:
    created = await registry.create(
        "search", address="https://tools.example.com/search", description="web search"
    )
    assert created.name == "tools/search" and created.kind == pb.TOOL_KIND_HTTP
    assert created.timeout.ToMilliseconds() == 10_000, "10 s when unset"
    assert not created.has_secret and created.etag
    await fails(grpc.StatusCode.ALREADY_EXISTS, registry.create("search", address="https://x.example"))

    got = await registry.tools.GetTool(pb.GetToolRequest(name="tools/search"), metadata=registry.md)
    assert got == created

    await registry.create("lookup", kind=pb.TOOL_KIND_GRPC, address="lookup.internal:50070",
                          timeout=seconds(2.5))
    await registry.create("zeta", address="http://127.0.0.1:9/z")
    first = await registry.tools.ListTools(pb.ListToolsRequest(page_size=2), metadata=registry.md)
    assert [t.name for t in first.tools] == ["tools/lookup", "tools/search"] and first.next_page_token
    rest = await registry.tools.ListTools(
        pb.ListToolsRequest(page_size=2, page_token=first.next_page_token), metadata=registry.md
    )
    assert [t.name for t in rest.tools] == ["tools/zeta"] and not rest.next_page_token
    assert first.tools[0].timeout.ToMilliseconds() == 2500

    updated = await registry.tools.UpdateTool(
        pb.UpdateToolRequest(
            tool=pb.Tool(name="tools/search", address="https://search.example.com/v2", etag=created.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["address"]),
        ),
        metadata=registry.md,
    )
    assert updated.address == "https://search.example.com/v2"
    assert updated.description == "web search", "fields outside the mask stay"
    assert updated.etag != created.etag
    # A write based on what was read before the update loses: ABORTED, retry after a fresh read.
    stale = pb.UpdateToolRequest(
        tool=pb.Tool(name="tools/search", description="stale", etag=created.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["description"]),
    )
    await fails(grpc.StatusCode.ABORTED, registry.tools.UpdateTool(stale, metadata=registry.md))
    await fails(grpc.StatusCode.ABORTED, registry.tools.DeleteTool(
        pb.DeleteToolRequest(name="tools/search", etag=created.etag), metadata=registry.md))

    # No mask: every field the request sets changes.
    implied = await registry.tools.UpdateTool(
        pb.UpdateToolRequest(tool=pb.Tool(name="tools/search", timeout=seconds(30))),
        metadata=registry.md,
    )
    assert implied.timeout.ToMilliseconds() == 30_000 and implied.address == updated.address

    await registry.tools.DeleteTool(
        pb.DeleteToolRequest(name="tools/search", etag=implied.etag), metadata=registry.md
    )
    await fails(grpc.StatusCode.NOT_FOUND, registry.tools.GetTool(
        pb.GetToolRequest(name="tools/search"), metadata=registry.md))
    await fails(grpc.StatusCode.NOT_FOUND, registry.tools.DeleteTool(
        pb.DeleteToolRequest(name="tools/search"), metadata=registry.md))

    events = await registry.audit.ListAuditEvents(
        registry_pb2.ListAuditEventsRequest(resource_prefix="tools/search"), metadata=registry.md
    )
    mine = [(e.method, e.tenant) for e in events.events if e.tenant == registry.tenant]
    assert mine == [("DeleteTool", registry.tenant), ("UpdateTool", registry.tenant),
                    ("UpdateTool", registry.tenant), ("CreateTool", registry.tenant)]


async def test_a_create_retried_with_its_request_id_returns_the_same_tool(registry: Registry) -> None:
    request = pb.CreateToolRequest(
        tool_id="retry", tool=pb.Tool(kind=pb.TOOL_KIND_HTTP, address="https://r.example"),
        request_id=uuid.uuid4().hex,
    )
    first = await registry.tools.CreateTool(request, metadata=registry.md)
    again = await registry.tools.CreateTool(request, metadata=registry.md)
    assert again == first


@pytest.mark.parametrize(
    ("tool_id", "tool", "field"),
    [
        ("9lives", pb.Tool(kind=pb.TOOL_KIND_HTTP, address="https://x.example"), "tool_id"),
        ("has space", pb.Tool(kind=pb.TOOL_KIND_HTTP, address="https://x.example"), "tool_id"),
        ("", pb.Tool(kind=pb.TOOL_KIND_HTTP, address="https://x.example"), "tool_id"),
        ("ok", pb.Tool(address="https://x.example"), "tool.kind"),
        ("ok", pb.Tool(kind=7, address="https://x.example"), "tool.kind"),  # type: ignore[arg-type]
        ("ok", pb.Tool(kind=pb.TOOL_KIND_HTTP), "tool.address"),
        ("ok", pb.Tool(kind=pb.TOOL_KIND_HTTP, address="ftp://x.example/f"), "tool.address"),
        ("ok", pb.Tool(kind=pb.TOOL_KIND_HTTP, address="x.example:80"), "tool.address"),
        ("ok", pb.Tool(kind=pb.TOOL_KIND_HTTP, address="https://u:p@x.example"), "tool.address"),
        ("ok", pb.Tool(kind=pb.TOOL_KIND_HTTP, address="http://x.example:99999"), "tool.address"),
        ("ok", pb.Tool(kind=pb.TOOL_KIND_GRPC), "tool.address"),
        ("ok", pb.Tool(kind=pb.TOOL_KIND_GRPC, address="http://x.example:80"), "tool.address"),
        ("ok", pb.Tool(kind=pb.TOOL_KIND_GRPC, address="x.example"), "tool.address"),
        ("ok", pb.Tool(kind=pb.TOOL_KIND_GRPC, address=":80"), "tool.address"),
        ("ok", pb.Tool(kind=pb.TOOL_KIND_HTTP, address="https://x.example", timeout=seconds(0)),
         "tool.timeout"),
        ("ok", pb.Tool(kind=pb.TOOL_KIND_HTTP, address="https://x.example", timeout=seconds(-1)),
         "tool.timeout"),
        ("ok", pb.Tool(kind=pb.TOOL_KIND_HTTP, address="https://x.example", timeout=seconds(301)),
         "tool.timeout"),
        ("ok", pb.Tool(kind=pb.TOOL_KIND_HTTP, address="https://x.example", secret=SECRET + "\r\nX: y"),
         "tool.secret"),
        ("ok", pb.Tool(kind=pb.TOOL_KIND_HTTP, address="https://x.example", description="d" * 2000),
         "tool.description"),
    ],
)
async def test_bad_input_names_the_field(
    registry: Registry, tool_id: str, tool: pb.Tool, field: str
) -> None:
    err = await fails(grpc.StatusCode.INVALID_ARGUMENT, registry.tools.CreateTool(
        pb.CreateToolRequest(tool_id=tool_id, tool=tool), metadata=registry.md))
    info, fields = error_details(err)
    assert fields == [field] and info.domain == "registry"
    assert SECRET not in (err.details() or "")


async def test_bad_updates_and_names_name_the_field(registry: Registry) -> None:
    await registry.create("web", address="https://x.example")
    for request, expected in (
        (pb.UpdateToolRequest(tool=pb.Tool(name="tools/web", etag="x"),
                              update_mask=field_mask_pb2.FieldMask(paths=["etag"])), "update_mask"),
        (pb.UpdateToolRequest(tool=pb.Tool(name="tools/web")), "update_mask"),
        (pb.UpdateToolRequest(tool=pb.Tool(name="web", address="https://y.example")), "tool.name"),
        # Switching the kind without a fitting address: the URL is not host:port.
        (pb.UpdateToolRequest(tool=pb.Tool(name="tools/web", kind=pb.TOOL_KIND_GRPC),
                              update_mask=field_mask_pb2.FieldMask(paths=["kind"])), "tool.address"),
    ):
        err = await fails(grpc.StatusCode.INVALID_ARGUMENT,
                          registry.tools.UpdateTool(request, metadata=registry.md))
        assert error_details(err)[1] == [expected]
    err = await fails(grpc.StatusCode.INVALID_ARGUMENT, registry.tools.GetTool(
        pb.GetToolRequest(name="agents/web"), metadata=registry.md))
    assert error_details(err)[1] == ["name"]


async def test_a_tenant_sees_only_its_own_tools(registry: Registry) -> None:
    await registry.create("shared_name", SECRET, address="https://acme.example/t")
    other = who(new_tenant())
    err = await fails(grpc.StatusCode.NOT_FOUND, registry.tools.GetTool(
        pb.GetToolRequest(name="tools/shared_name"), metadata=other))
    assert registry.tenant not in (err.details() or "")
    listed = await registry.tools.ListTools(pb.ListToolsRequest(), metadata=other)
    assert list(listed.tools) == []
    await fails(grpc.StatusCode.NOT_FOUND, registry.tools.UpdateTool(
        pb.UpdateToolRequest(tool=pb.Tool(name="tools/shared_name", address="https://evil.example")),
        metadata=other))
    await fails(grpc.StatusCode.NOT_FOUND, registry.tools.DeleteTool(
        pb.DeleteToolRequest(name="tools/shared_name"), metadata=other))
    # The other tenant can have a tool by the same name, without touching the first one's.
    theirs = await registry.tools.CreateTool(pb.CreateToolRequest(
        tool_id="shared_name", tool=pb.Tool(kind=pb.TOOL_KIND_HTTP, address="https://globex.example")),
        metadata=other)
    assert not theirs.has_secret
    mine = await registry.tools.GetTool(pb.GetToolRequest(name="tools/shared_name"), metadata=registry.md)
    assert mine.address == "https://acme.example/t" and mine.has_secret


async def test_the_secret_is_sealed_at_rest_and_never_returned(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    created = await registry.create("vault", SECRET, address="https://vault.example/q?k=1")
    assert created.has_secret and created.secret == ""
    answers: list[Any] = [
        created,
        await registry.tools.GetTool(pb.GetToolRequest(name="tools/vault"), metadata=registry.md),
        await registry.tools.ListTools(pb.ListToolsRequest(), metadata=registry.md),
        await registry.tools.UpdateTool(pb.UpdateToolRequest(
            tool=pb.Tool(name="tools/vault", secret=SECRET + "-2"),
            update_mask=field_mask_pb2.FieldMask(paths=["secret"])), metadata=registry.md),
        await registry.audit.ListAuditEvents(
            registry_pb2.ListAuditEventsRequest(resource_prefix="tools/vault"), metadata=registry.md),
    ]
    for answer in answers:
        assert SECRET.encode() not in answer.SerializeToString()

    conn = await asyncpg.connect(registry.settings.database_url)
    try:
        sealed = await conn.fetchval(
            "SELECT secret_ciphertext FROM registry.tools WHERE tenant = $1 AND name = 'vault'",
            registry.tenant,
        )
        assert isinstance(sealed, bytes) and SECRET.encode() not in sealed
        box = SecretBox(KEY)
        assert box.open(sealed, tenant=registry.tenant, tool="vault") == SECRET + "-2"
        with pytest.raises(SecretError):
            box.open(sealed, tenant=registry.tenant, tool="decoy")
        # Copied onto another tool's row, the ciphertext does not open there either.
        await registry.create("decoy", address="https://decoy.example")
        await conn.execute(
            "UPDATE registry.tools SET secret_ciphertext = $2 WHERE tenant = $1 AND name = 'decoy'",
            registry.tenant, sealed,
        )
    finally:
        await conn.close()
    err = await fails(grpc.StatusCode.FAILED_PRECONDITION, registry.secrets.ResolveTool(
        pb.ResolveToolRequest(tenant=registry.tenant, tool="decoy"), metadata=registry.internal))
    assert "corral tools update decoy" in (err.details() or "")

    resolved = await registry.secrets.ResolveTool(
        pb.ResolveToolRequest(tenant=registry.tenant, tool="vault"), metadata=registry.internal)
    assert resolved.secret == SECRET + "-2" and resolved.tool.has_secret and resolved.tool.secret == ""

    # "secret" in the mask with no secret removes it.
    cleared = await registry.tools.UpdateTool(pb.UpdateToolRequest(
        tool=pb.Tool(name="tools/vault"), update_mask=field_mask_pb2.FieldMask(paths=["secret"])),
        metadata=registry.md)
    assert not cleared.has_secret
    resolved = await registry.secrets.ResolveTool(
        pb.ResolveToolRequest(tenant=registry.tenant, tool="vault"), metadata=registry.internal)
    assert resolved.secret == ""
    assert not [r for r in caplog.records if SECRET in r.getMessage()]


async def test_without_a_key_only_secretless_tools_can_be_created(
    services: harness.Platform, settings: Settings
) -> None:
    assert not settings.secrets_key
    await services.start("registry")
    md = who(new_tenant())
    async with grpc.aio.insecure_channel(services.settings.addrs["registry"]) as channel:
        stub: tools_pb2_grpc.ToolServiceAsyncStub = tools_pb2_grpc.ToolServiceStub(channel)
        err = await fails(grpc.StatusCode.FAILED_PRECONDITION, stub.CreateTool(pb.CreateToolRequest(
            tool_id="keyed", tool=pb.Tool(kind=pb.TOOL_KIND_HTTP, address="https://x.example", secret=SECRET),
        ), metadata=md))
        assert "CORRAL_SECRETS_KEY" in (err.details() or "") and SECRET not in (err.details() or "")
        plain = await stub.CreateTool(pb.CreateToolRequest(
            tool_id="plain", tool=pb.Tool(kind=pb.TOOL_KIND_HTTP, address="https://x.example")), metadata=md)
        assert plain.name == "tools/plain" and not plain.has_secret


async def test_the_cli_manages_tools_and_reads_secrets_from_env(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_REGISTRY_ADDR", registry.settings.addrs["registry"])
    monkeypatch.setenv("MY_TOOL_SECRET", SECRET)

    def run(*args: str) -> Any:
        state = State()
        state.json, state.tenant, state.user = True, registry.tenant, "bob"
        try:
            result = CliRunner().invoke(tools_cli, list(args), obj=state, catch_exceptions=False)
        finally:
            state.client.close()
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    created = await asyncio.to_thread(
        run, "create", "cli_tool", "--kind", "grpc", "--address", "127.0.0.1:50999",
        "--timeout", "1500ms", "--secret-env", "MY_TOOL_SECRET", "--description", "from the cli",
    )
    assert created["name"] == "tools/cli_tool" and created["has_secret"] is True
    assert created["timeout"] == "1.500s" and SECRET not in json.dumps(created)
    listed = await asyncio.to_thread(run, "list")
    assert [t["name"] for t in listed] == ["tools/cli_tool"]
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    updated = await asyncio.to_thread(run, "update", "cli_tool", "--secret-file", str(secret_file))
    assert updated["has_secret"] is True
    resolved = await registry.secrets.ResolveTool(
        pb.ResolveToolRequest(tenant=registry.tenant, tool="cli_tool"), metadata=registry.internal)
    assert resolved.secret == "from-a-file"
    cleared = await asyncio.to_thread(run, "update", "cli_tool", "--clear-secret")
    assert "has_secret" not in cleared
    assert await asyncio.to_thread(run, "delete", "cli_tool") == {"deleted": "tools/cli_tool"}


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

    async def call(self, tool: str, payload: bytes = b'{"q": 1}', *, allowed: tuple[str, ...] | None = None,
                   timeout_s: float | None = None, deadline_in: float = 30.0) -> ToolOutcome:
        return await self.broker.call(
            tenant=self.registry.tenant, tool=tool, allowed=allowed if allowed is not None else (tool,),
            token=TOKEN, payload=payload, content_type="application/json", timeout_s=timeout_s,
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
    await registry.create("metadata", address="http://169.254.169.254/latest/meta-data")
    await registry.create("refused", address=f"http://{harness.refused_address()}/x")
    await registry.create("rpc", SECRET, kind=pb.TOOL_KIND_GRPC, address=f"127.0.0.1:{grpc_port}")
    await registry.create("rpc_refused", kind=pb.TOOL_KIND_GRPC, address=harness.refused_address())
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    resolver = CountingResolver(RegistryToolResolver(registry.settings))
    broker = ToolBroker(resolver=resolver, transport=ToolTransport.from_settings(registry.settings),
                        tracer=provider.get_tracer("test"))
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


async def test_resolving_secrets_takes_the_internal_token(registry: Registry) -> None:
    await registry.create("guarded", address="https://tools.example.com/g", secret="hush-hush-1")
    request = pb.ResolveToolRequest(tenant=registry.tenant, tool="guarded")
    for metadata in ((), (("x-corral-internal-token", "guess"),)):
        err = await fails(grpc.StatusCode.PERMISSION_DENIED,
                          registry.secrets.ResolveTool(request, metadata=metadata))
        assert "executors only" in (err.details() or "") and "hush-hush-1" not in str(err)
    resolved = await registry.secrets.ResolveTool(request, metadata=registry.internal)
    assert resolved.secret == "hush-hush-1"


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
        dataclasses.replace(registry.settings, executor=dataclasses.replace(
            registry.settings.executor, tools_allow_loopback=False))))
    try:
        outcome = await strict.call(
            tenant=registry.tenant, tool="web", allowed=("web",), token=TOKEN, payload=b"{}",
            content_type="application/json", timeout_s=None, deadline=time.time() + 10,
            attributes={}, context=None)
    finally:
        await strict.close()
    assert outcome.error_code == PERMISSION_DENIED and "CORRAL_TOOLS_ALLOW_LOOPBACK" in outcome.error
    assert tools.http.requests == []
