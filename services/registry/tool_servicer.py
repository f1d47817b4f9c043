"""ToolService over gRPC: tools an agent may call, per tenant. Requests to parsed names and
drafts, one call into tools.py, records back to messages. Only conversion here."""

from __future__ import annotations

from google.protobuf import duration_pb2, empty_pb2

from corral import names
from corral.names import ToolRef
from corral.registry.v1 import tools_pb2 as pb
from corral.registry.v1 import tools_pb2_grpc
from services.common.identity import caller
from services.common.interceptors import Context
from services.common.timestamps import timestamp
from services.registry import tool_rules
from services.registry.messages import each, paging
from services.registry.tool_model import ToolDraft, ToolKind, ToolRecord
from services.registry.tools import Tools

_KIND_TO_PB: dict[ToolKind, pb.ToolKind.ValueType] = {
    "http": pb.TOOL_KIND_HTTP, "grpc": pb.TOOL_KIND_GRPC,
}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}


def tool_pb(r: ToolRecord) -> pb.Tool:
    timeout = duration_pb2.Duration()
    timeout.FromMilliseconds(r.spec.timeout_ms)
    return pb.Tool(
        name=r.ref.name, kind=_KIND_TO_PB[r.spec.kind], address=r.spec.address, timeout=timeout,
        description=r.spec.description, has_secret=r.has_secret,
        create_time=timestamp(r.create_time), update_time=timestamp(r.update_time), etag=r.etag,
    )


def tool_draft(tool: pb.Tool) -> ToolDraft:
    # An unset kind is ""; one this registry does not know keeps its number, for the rules to refuse.
    kind = _KIND_FROM_PB.get(tool.kind) or (str(tool.kind) if tool.kind else "")
    timeout = tool.timeout.seconds * 1_000_000_000 + tool.timeout.nanos
    return ToolDraft(
        kind=kind, address=tool.address, timeout_ns=timeout if tool.HasField("timeout") else None,
        description=tool.description, secret=tool.secret,
    )


class ToolServicer(tools_pb2_grpc.ToolServiceServicer):
    def __init__(self, tools: Tools) -> None:
        self.tools = tools

    async def CreateTool(self, request: pb.CreateToolRequest, context: Context) -> pb.Tool:
        tool = ToolRef(names.TOOL_IDS.check(request.tool_id, field="tool_id"))
        draft = tool_draft(request.tool)
        spec = tool_rules.tool_spec(draft)
        secret = tool_rules.check_secret(draft.secret, "tool.secret")
        return tool_pb(await self.tools.create(caller(context), tool, spec, secret, request.request_id))

    async def GetTool(self, request: pb.GetToolRequest, context: Context) -> pb.Tool:
        return tool_pb(await self.tools.get(caller(context), ToolRef.parse(request.name)))

    async def ListTools(self, request: pb.ListToolsRequest, context: Context) -> pb.ListToolsResponse:
        page = await self.tools.list_tools(paging(request, context))
        return pb.ListToolsResponse(tools=each(page, tool_pb), next_page_token=page.next_page_token)

    async def UpdateTool(self, request: pb.UpdateToolRequest, context: Context) -> pb.Tool:
        tool = ToolRef.parse(request.tool.name, field="tool.name")
        change = tool_rules.tool_change(tool_draft(request.tool), request.update_mask.paths)
        return tool_pb(await self.tools.update(caller(context), tool, change, request.tool.etag))

    async def DeleteTool(self, request: pb.DeleteToolRequest, context: Context) -> empty_pb2.Empty:
        await self.tools.delete(caller(context), ToolRef.parse(request.name), request.etag)
        return empty_pb2.Empty()
