"""ToolSecretsService over gRPC, internal: the executor's broker resolves tools here (with their
decrypted secrets), proving itself with the deployment's internal token (CORRAL_INTERNAL_TOKEN,
shared by registries and executors only). Not routed by Envoy either."""

from __future__ import annotations

from corral import names
from corral.names import ToolRef
from corral.registry.v1 import tools_pb2 as pb
from corral.registry.v1 import tools_pb2_grpc
from services.common.interceptors import Context
from services.registry import tool_rules
from services.registry.tool_servicer import tool_pb
from services.registry.tools import Tools

INTERNAL_TOKEN_HEADER = "x-corral-internal-token"


class ToolSecretsServicer(tools_pb2_grpc.ToolSecretsServiceServicer):
    def __init__(self, tools: Tools, internal_token: str) -> None:
        self.tools = tools
        self.internal_token = internal_token

    async def ResolveTool(self, request: pb.ResolveToolRequest, context: Context) -> pb.ResolvedTool:
        presented = dict(context.invocation_metadata() or ()).get(INTERNAL_TOKEN_HEADER, "")
        tool_rules.check_internal_token(presented if isinstance(presented, str) else "", self.internal_token)
        tenant = tool_rules.check_tenant(request.tenant)
        tool = ToolRef(names.TOOL_IDS.check(request.tool, field="tool"))
        record, secret = await self.tools.resolve(tenant, tool)
        return pb.ResolvedTool(tool=tool_pb(record), secret=secret)
