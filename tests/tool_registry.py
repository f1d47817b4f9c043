"""The registry's tools as a tenant's tests reach them: a client with a tenant of its own, a
tool's secret, the secrets key the registry seals it with, and the invocation token an agent's
tool calls carry."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from google.protobuf import duration_pb2

from corral.registry.v1 import registry_pb2_grpc, tools_pb2_grpc
from corral.registry.v1 import tools_pb2 as pb
from services.common.settings import Settings
from tests.rpc import Metadata

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

    async def create(self, tool_id: str, secret: str = "", **fields: Any) -> pb.Tool:
        tool = pb.Tool(secret=secret, **{"kind": pb.TOOL_KIND_HTTP, **fields})
        return await self.tools.CreateTool(
            pb.CreateToolRequest(tool_id=tool_id, tool=tool), metadata=self.md
        )
