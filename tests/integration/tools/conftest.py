"""The `registry` fixture for the tool tests: a real registry with a secrets key, a client with a
tenant of its own, and the executor's view of it (ResolveTool)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from corral.registry.v1 import registry_pb2_grpc, tools_pb2_grpc
from tests.credentials import internal_channel
from tests.rpc import new_tenant, who
from tests.tool_registry import Registry, registry_with_key


@pytest_asyncio.fixture
async def registry(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Registry]:
    """A registry with a secrets key; a tenant of its own keeps each test apart."""
    async with (
        registry_with_key(database_url, redis_url, tmp_path) as (settings, channel),
        internal_channel(settings, "registry", "executor") as executor,
    ):
        tenant = new_tenant()
        yield Registry(
            settings,
            tools_pb2_grpc.ToolServiceStub(channel),
            tools_pb2_grpc.ToolSecretsServiceStub(executor),
            registry_pb2_grpc.RegistryServiceStub(channel),
            tenant,
            who(tenant),
        )
