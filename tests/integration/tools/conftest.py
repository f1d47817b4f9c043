"""The `registry` fixture for the tool tests: a real registry with a secrets key, and a client
with a tenant of its own."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from corral.registry.v1 import registry_pb2_grpc, tools_pb2_grpc
from tests import harness
from tests.credentials import internal_channel, public_channel
from tests.rpc import new_tenant, who
from tests.tool_registry import KEY, Registry


@pytest_asyncio.fixture
async def registry(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Registry]:
    """A registry with a secrets key; a tenant of its own keeps each test apart."""
    settings = harness.make_settings(
        database_url, redis_url, tmp_path, CORRAL_SECRETS_KEY=base64.b64encode(KEY).decode()
    )
    platform = await harness.start_mesh(settings, "registry")
    try:
        async with (
            public_channel(platform.settings.addrs["registry"]) as channel,
            internal_channel(platform.settings, "registry", "executor") as executor,
        ):
            tenant = new_tenant()
            yield Registry(
                platform.settings,
                tools_pb2_grpc.ToolServiceStub(channel),
                tools_pb2_grpc.ToolSecretsServiceStub(executor),
                registry_pb2_grpc.RegistryServiceStub(channel),
                tenant,
                who(tenant),
            )
    finally:
        await platform.stop()
