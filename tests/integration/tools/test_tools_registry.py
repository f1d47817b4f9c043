"""Tools as a tenant sees them: a real registry on real PostgreSQL creating, listing, updating
and deleting tools per tenant, and naming the field of bad input."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2

from corral.registry.v1 import registry_pb2
from corral.registry.v1 import tools_pb2 as pb
from tests.rpc import error_details, fails, new_tenant, who
from tests.tool_registry import SECRET, Registry, seconds

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


# -- the registry: CRUD, validation, tenants ---------------------------------------------------


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
