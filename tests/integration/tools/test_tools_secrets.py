"""Tool secrets: sealed at rest in the registry and never returned, refused without a key,
set from the CLI, and resolved only by executors proving themselves with their certificate."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from click.testing import CliRunner
from google.protobuf import field_mask_pb2

from corral.cli import State
from corral.cli.tools import tools as tools_cli
from corral.registry.v1 import registry_pb2, tools_pb2_grpc
from corral.registry.v1 import tools_pb2 as pb
from services.common.settings import Settings
from services.registry.secrets import SecretBox, SecretError
from tests import harness
from tests.credentials import internal_channel, public_channel, token
from tests.rpc import fails, new_tenant, who
from tests.tool_registry import KEY, SECRET, Registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


# -- secrets -----------------------------------------------------------------------------------


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
        pb.ResolveToolRequest(tenant=registry.tenant, tool="decoy")))
    assert "corral tools update decoy" in (err.details() or "")

    resolved = await registry.secrets.ResolveTool(
        pb.ResolveToolRequest(tenant=registry.tenant, tool="vault"))
    assert resolved.secret == SECRET + "-2" and resolved.tool.has_secret and resolved.tool.secret == ""

    # "secret" in the mask with no secret removes it.
    cleared = await registry.tools.UpdateTool(pb.UpdateToolRequest(
        tool=pb.Tool(name="tools/vault"), update_mask=field_mask_pb2.FieldMask(paths=["secret"])),
        metadata=registry.md)
    assert not cleared.has_secret
    resolved = await registry.secrets.ResolveTool(
        pb.ResolveToolRequest(tenant=registry.tenant, tool="vault"))
    assert resolved.secret == ""
    assert not [r for r in caplog.records if SECRET in r.getMessage()]


async def test_without_a_key_only_secretless_tools_can_be_created(
    services: harness.Platform, settings: Settings
) -> None:
    assert not settings.secrets_key
    await services.start("registry")
    md = who(new_tenant())
    async with public_channel(services.settings.addrs["registry"]) as channel:
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
    # The command calls with a credential from the environment, as a user's shell would give it.
    monkeypatch.setenv("CORRAL_TOKEN", token(registry.tenant, "bob"))

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
        pb.ResolveToolRequest(tenant=registry.tenant, tool="cli_tool"))
    assert resolved.secret == "from-a-file"
    cleared = await asyncio.to_thread(run, "update", "cli_tool", "--clear-secret")
    assert "has_secret" not in cleared
    assert await asyncio.to_thread(run, "delete", "cli_tool") == {"deleted": "tools/cli_tool"}


async def test_only_an_executor_resolves_secrets(registry: Registry) -> None:
    """ResolveTool answers an executor proving itself with its certificate: not a tenant's
    administrator on the public port, not another Corral service."""
    await registry.create("guarded", address="https://tools.example.com/g", secret="hush-hush-1")
    request = pb.ResolveToolRequest(tenant=registry.tenant, tool="guarded")
    async with (
        public_channel(registry.settings.addrs["registry"]) as public,
        internal_channel(registry.settings, "registry", "router") as router,
    ):
        for channel, who_calls in ((public, "an administrator"), (router, "the router")):
            secrets = tools_pb2_grpc.ToolSecretsServiceStub(channel)
            err = await fails(grpc.StatusCode.PERMISSION_DENIED,
                              secrets.ResolveTool(request, metadata=registry.md))
            assert "hush-hush-1" not in str(err), who_calls
    resolved = await registry.secrets.ResolveTool(request)
    assert resolved.secret == "hush-hush-1"
