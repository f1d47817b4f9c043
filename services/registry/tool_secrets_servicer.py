"""ToolSecretsService over gRPC, internal: the executor's broker resolves tools here (with their
decrypted secrets). Only a peer with the executor's certificate reaches it (the access table in
services/common/auth/methods.py); Envoy does not route it."""

from __future__ import annotations

from corral import names
from corral.names import ToolRef
from corral.registry.v1 import tools_pb2 as pb
from corral.registry.v1 import tools_pb2_grpc
from services.common.interceptors import Context
from services.registry import tool_rules
from services.registry.tool_servicer import tool_pb
from services.registry.tools import Tools


class ToolSecretsServicer(tools_pb2_grpc.ToolSecretsServiceServicer):
    def __init__(self, tools: Tools) -> None:
        self.tools = tools

    async def ResolveTool(self, request: pb.ResolveToolRequest, context: Context) -> pb.ResolvedTool:
        tenant = tool_rules.check_tenant(request.tenant)
        tool = ToolRef(names.TOOL_IDS.check(request.tool, field="tool"))
        record, secret = await self.tools.resolve(tenant, tool)
        return pb.ResolvedTool(tool=tool_pb(record), secret=secret)
