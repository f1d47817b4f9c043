"""The registry's tools as a tenant's tests reach them: a client with a tenant of its own, a
tool's secret, the secrets key the registry seals it with, and the invocation token an agent's
tool calls carry."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2

from corral.registry.v1 import registry_pb2_grpc, tools_pb2_grpc
from corral.registry.v1 import tools_pb2 as pb
from services.common.settings import Settings
from tests import harness
from tests.credentials import public_channel
from tests.rpc import Metadata

SECRET = "sk-test-" + "7f3a9c" * 4
TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl"
KEY = os.urandom(32)


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


@asynccontextmanager
async def registry_with_key(
    database_url: str, redis_url: str, tmp: Path
) -> AsyncIterator[tuple[Settings, grpc.aio.Channel]]:
    """A real registry that seals tool secrets with KEY, and a channel to it."""
    settings = harness.make_settings(
        database_url, redis_url, tmp, CORRAL_SECRETS_KEY=base64.b64encode(KEY).decode()
    )
    platform = await harness.start_mesh(settings, "registry")
    try:
        async with public_channel(platform.settings.addrs["registry"]) as channel:
            yield platform.settings, channel
    finally:
        await platform.stop()


@dataclass
class Registry:
    settings: Settings
    tools: tools_pb2_grpc.ToolServiceAsyncStub
    secrets: tools_pb2_grpc.ToolSecretsServiceAsyncStub
    audit: registry_pb2_grpc.RegistryServiceAsyncStub
    tenant: str
    md: Metadata = ()

    async def create(self, tool_id: str, secret: str = "", **fields: Any) -> pb.Tool:
        tool = pb.Tool(secret=secret, **{"kind": pb.TOOL_KIND_HTTP, **fields})
        return await self.tools.CreateTool(
            pb.CreateToolRequest(tool_id=tool_id, tool=tool), metadata=self.md
        )
