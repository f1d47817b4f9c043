"""Tools an agent may call, per tenant: gRPC ↔ domain for ToolService and the executor-only
ToolSecretsService, and the small domain between them (validation, secrets sealed at rest)."""

from __future__ import annotations

import hmac
import logging
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import grpc
from google.protobuf import duration_pb2, empty_pb2

from corral import names
from corral.registry.v1 import tools_pb2 as pb
from corral.registry.v1 import tools_pb2_grpc
from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.common.identity import Caller, caller
from services.common.paging import paged
from services.common.timestamps import timestamp
from services.registry.secrets import SecretBox, SecretError
from services.registry.tool_store import ToolRecord, ToolSpec, ToolStore

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MS = 10_000
MAX_TIMEOUT_MS = 300_000
MAX_SECRET_CHARS = 4096
MAX_DESCRIPTION_CHARS = 1024
MAX_ADDRESS_CHARS = 2048
# Tool ids follow the endpoint-id rule: agent.toml names tools like session_data.
_TOOL_ID = re.compile(rf"^{names.ENDPOINT_ID}$")
_TOOL_NAME = re.compile(rf"^tools/({names.ENDPOINT_ID})$")
# A header / metadata value: printable ASCII, so it cannot break the request it rides in.
_SECRET = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$")
_KINDS = {pb.TOOL_KIND_HTTP: "http", pb.TOOL_KIND_GRPC: "grpc"}
_KIND_PB = {v: k for k, v in _KINDS.items()}
MUTABLE_FIELDS = ("kind", "address", "timeout", "description", "secret")
NO_KEY = (
    "secrets are encrypted at rest and this registry has no key: set CORRAL_SECRETS_KEY to the "
    "base64 of 32 random bytes and restart it (tools without a secret work without one)"
)


def tool_name(tool: str) -> str:
    return f"tools/{tool}"


# -- validation: each failure names the field --------------------------------------------------


def check_tool_id(tool: str, field: str) -> str:
    if not _TOOL_ID.match(tool):
        raise InvalidArgument.field(
            field, f"{tool!r} must start with a letter; letters, digits, _ and -; at most 63"
        )
    return tool


def parse_tool_name(name: str, field: str) -> str:
    m = _TOOL_NAME.match(name)
    if not m:
        raise InvalidArgument.field(field, f"{name!r} is not a tool name (tools/{{tool}})")
    return m.group(1)


def check_kind(kind: int, field: str) -> str:
    if kind not in _KINDS:
        raise InvalidArgument.field(field, "must be HTTP or GRPC")
    return _KINDS[kind]


def check_address(kind: str, address: str, field: str) -> str:
    if not address:
        what = "an http(s) URL" if kind == "http" else "host:port"
        raise InvalidArgument.field(field, f"required: {what} for a {kind.upper()} tool")
    if len(address) > MAX_ADDRESS_CHARS or any(c.isspace() for c in address):
        raise InvalidArgument.field(field, f"must be at most {MAX_ADDRESS_CHARS} characters, no spaces")
    if kind == "http":
        _check_url(address, field)
    else:
        _check_host_port(address, field)
    return address


def _check_url(address: str, field: str) -> None:
    try:
        url = urlsplit(address)
        url.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise InvalidArgument.field(field, f"{address!r} is not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise InvalidArgument.field(field, f"{address!r} must be an http:// or https:// URL with a host")
    if url.username is not None or url.password is not None:
        # Credentials in a URL end up in logs and audit details; the secret field is encrypted.
        raise InvalidArgument.field(field, "must not carry user:password@; set the tool's secret instead")


def _check_host_port(address: str, field: str) -> None:
    if "://" in address:
        raise InvalidArgument.field(field, f"{address!r}: a GRPC tool's address is host:port, not a URL")
    host, sep, port = address.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument.field(field, f"{address!r} must be host:port with a port from 1 to 65535")


def check_timeout(timeout: duration_pb2.Duration | None, field: str) -> int:
    """Milliseconds of a tool's timeout (rounded up), 10 s when unset."""
    if timeout is None:
        return DEFAULT_TIMEOUT_MS
    nanos = timeout.seconds * 1_000_000_000 + timeout.nanos
    if nanos <= 0 or nanos > MAX_TIMEOUT_MS * 1_000_000:
        raise InvalidArgument.field(field, f"must be more than 0 and at most {MAX_TIMEOUT_MS // 1000}s")
    return math.ceil(nanos / 1_000_000)


def check_description(description: str, field: str) -> str:
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidArgument.field(field, f"must be at most {MAX_DESCRIPTION_CHARS} characters")
    return description


def check_secret(secret: str, field: str) -> str:
    # The value is never echoed back: only what is wrong with it.
    if len(secret) > MAX_SECRET_CHARS:
        raise InvalidArgument.field(field, f"must be at most {MAX_SECRET_CHARS} characters")
    if secret and not _SECRET.match(secret):
        raise InvalidArgument.field(
            field, "must be printable ASCII without leading or trailing spaces (it travels as a header)"
        )
    return secret


# -- domain ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolChange:
    """An update: None leaves a field as it is; secret "" removes the secret."""

    kind: str | None = None
    address: str | None = None
    timeout_ms: int | None = None
    description: str | None = None
    secret: str | None = None


def _audit_details(spec: ToolSpec, has_secret: bool, changed: Collection[str] = ()) -> dict[str, object]:
    # The address without query or fragment (they may carry tokens); never the secret.
    url = urlsplit(spec.address) if spec.kind == "http" else None
    address = f"{url.scheme}://{url.netloc}{url.path}" if url else spec.address
    details: dict[str, object] = {
        "kind": spec.kind, "address": address, "timeout_ms": spec.timeout_ms, "has_secret": has_secret,
    }
    if changed:
        details["changed"] = sorted(changed)
    return details


class Tools:
    """Tools per tenant. Secrets are sealed before they reach the store and opened only for
    resolve(); with no key configured, tools without secrets still work."""

    def __init__(self, store: ToolStore, box: SecretBox | None) -> None:
        self.store = store
        self.box = box

    def _seal(self, tenant: str, tool: str, secret: str) -> bytes | None:
        if not secret:
            return None
        if self.box is None:
            raise FailedPrecondition(f"tool.secret: {NO_KEY}", reason="SECRETS_KEY_MISSING")
        return self.box.seal(secret, tenant=tenant, tool=tool)

    async def create(
        self, who: Caller, tool: str, spec: ToolSpec, secret: str, request_id: str = ""
    ) -> ToolRecord:
        sealed = self._seal(who.tenant, tool, secret)
        async with self.store.tx() as tx:
            if request_id:
                earlier = await tx.claim_request(who.tenant, request_id, tool_name(tool))
                if earlier is not None:
                    return await self.get(who, parse_tool_name(earlier, "request_id"))
            record = await tx.insert(who.tenant, tool, spec, sealed, who.user)
            if record is None:
                raise AlreadyExists(
                    f"{tool_name(tool)} already exists; change it with `corral tools update {tool}`"
                )
            await tx.audit(who.tenant, who.user, "CreateTool", tool_name(tool),
                           _audit_details(spec, record.has_secret))
        log.info("created %s for tenant %s (%s)", tool_name(tool), who.tenant, spec.kind)
        return record

    async def get(self, who: Caller, tool: str) -> ToolRecord:
        record = await self.store.get(who.tenant, tool)
        if record is None:
            raise self._not_found(tool)
        return record

    async def list_tools(self, who: Caller, offset: int, limit: int) -> list[ToolRecord]:
        return await self.store.list_tools(who.tenant, offset, limit)

    async def update(self, who: Caller, tool: str, change: ToolChange, etag: str = "") -> ToolRecord:
        async with self.store.tx() as tx:
            current = await tx.get_for_update(who.tenant, tool)
            if current is None:
                raise self._not_found(tool)
            self._check_etag(current, etag)
            spec = self._merged(current.spec, change)
            sealed = current.secret_ciphertext
            if change.secret is not None:
                sealed = self._seal(who.tenant, tool, change.secret)
            record = await tx.update(who.tenant, tool, spec, sealed)
            changed = [f for f in ("kind", "address", "timeout_ms", "description", "secret")
                       if getattr(change, f) is not None]
            await tx.audit(who.tenant, who.user, "UpdateTool", tool_name(tool),
                           _audit_details(spec, record.has_secret, changed))
        return record

    async def delete(self, who: Caller, tool: str, etag: str = "") -> None:
        async with self.store.tx() as tx:
            current = await tx.get_for_update(who.tenant, tool)
            if current is None:
                raise self._not_found(tool)
            self._check_etag(current, etag)
            await tx.delete(who.tenant, tool)
            await tx.audit(who.tenant, who.user, "DeleteTool", tool_name(tool), {})

    async def resolve(self, tenant: str, tool: str) -> tuple[ToolRecord, str]:
        """The tool and its decrypted secret ("" when it has none), for the executor's broker."""
        record = await self.store.get(tenant, tool)
        if record is None:
            raise self._not_found(tool)
        if record.secret_ciphertext is None:
            return record, ""
        if self.box is None:
            raise FailedPrecondition(f"{tool_name(tool)} has a secret but {NO_KEY}",
                                     reason="SECRETS_KEY_MISSING")
        try:
            return record, self.box.open(record.secret_ciphertext, tenant=tenant, tool=tool)
        except SecretError as exc:
            log.error("cannot open the secret of %s/%s: %s", tenant, tool, exc)
            raise FailedPrecondition(
                f"{tool_name(tool)}: {exc}; set the secret again with `corral tools update {tool}`",
                reason="SECRET_UNREADABLE",
            ) from None

    @staticmethod
    def _merged(spec: ToolSpec, change: ToolChange) -> ToolSpec:
        merged = replace(
            spec,
            kind=change.kind if change.kind is not None else spec.kind,
            address=change.address if change.address is not None else spec.address,
            timeout_ms=change.timeout_ms if change.timeout_ms is not None else spec.timeout_ms,
            description=change.description if change.description is not None else spec.description,
        )
        # A new kind must come with an address of that kind (or keep one that fits it).
        check_address(merged.kind, merged.address, "tool.address")
        return merged

    @staticmethod
    def _check_etag(current: ToolRecord, etag: str) -> None:
        if etag and etag != current.etag:
            raise Aborted(
                f"{tool_name(current.id)} changed since it was read (etag {etag}, now "
                f"{current.etag}); get it again and retry",
                reason="ETAG_MISMATCH",
            )

    @staticmethod
    def _not_found(tool: str) -> NotFound:
        # The same answer whether another tenant has the tool or nobody does.
        return NotFound(f"{tool_name(tool)} does not exist; create it with `corral tools create {tool}`")


# -- gRPC ↔ domain -----------------------------------------------------------------------------


def tool_pb(r: ToolRecord) -> pb.Tool:
    timeout = duration_pb2.Duration()
    timeout.FromMilliseconds(r.spec.timeout_ms)
    return pb.Tool(
        name=tool_name(r.id), kind=_KIND_PB[r.spec.kind], address=r.spec.address, timeout=timeout,
        description=r.spec.description, has_secret=r.has_secret,
        create_time=timestamp(r.create_time), update_time=timestamp(r.update_time), etag=r.etag,
    )


def spec_from_pb(tool: pb.Tool) -> ToolSpec:
    kind = check_kind(tool.kind, "tool.kind")
    return ToolSpec(
        kind=kind,
        address=check_address(kind, tool.address, "tool.address"),
        timeout_ms=check_timeout(tool.timeout if tool.HasField("timeout") else None, "tool.timeout"),
        description=check_description(tool.description, "tool.description"),
    )


def change_from_pb(request: pb.UpdateToolRequest) -> ToolChange:
    tool = request.tool
    paths = list(request.update_mask.paths)
    if not paths:
        # AIP-134: no mask means every field the request populated.
        paths = [f for f, present in (
            ("kind", tool.kind != pb.TOOL_KIND_UNSPECIFIED), ("address", bool(tool.address)),
            ("timeout", tool.HasField("timeout")), ("description", bool(tool.description)),
            ("secret", bool(tool.secret)),
        ) if present]
    for path in paths:
        if path not in MUTABLE_FIELDS:
            raise InvalidArgument.field(
                "update_mask", f"{path!r} cannot be changed; use {', '.join(MUTABLE_FIELDS)}"
            )
    if not paths:
        raise InvalidArgument.field("update_mask", f"nothing to change; set one of {', '.join(MUTABLE_FIELDS)}")
    return ToolChange(
        kind=check_kind(tool.kind, "tool.kind") if "kind" in paths else None,
        address=tool.address if "address" in paths else None,
        timeout_ms=check_timeout(tool.timeout if tool.HasField("timeout") else None, "tool.timeout")
        if "timeout" in paths else None,
        description=check_description(tool.description, "tool.description")
        if "description" in paths else None,
        secret=check_secret(tool.secret, "tool.secret") if "secret" in paths else None,
    )


class ToolServicer(tools_pb2_grpc.ToolServiceServicer):
    def __init__(self, tools: Tools) -> None:
        self.tools = tools

    async def CreateTool(self, request: pb.CreateToolRequest, context: grpc.aio.ServicerContext) -> pb.Tool:
        tool = check_tool_id(request.tool_id, "tool_id")
        spec = spec_from_pb(request.tool)
        secret = check_secret(request.tool.secret, "tool.secret")
        return tool_pb(await self.tools.create(caller(context), tool, spec, secret, request.request_id))

    async def GetTool(self, request: pb.GetToolRequest, context: grpc.aio.ServicerContext) -> pb.Tool:
        return tool_pb(await self.tools.get(caller(context), parse_tool_name(request.name, "name")))

    async def ListTools(
        self, request: pb.ListToolsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListToolsResponse:
        who = caller(context)
        rows, token = await paged(request, lambda o, n: self.tools.list_tools(who, o, n))
        return pb.ListToolsResponse(tools=[tool_pb(r) for r in rows], next_page_token=token)

    async def UpdateTool(self, request: pb.UpdateToolRequest, context: grpc.aio.ServicerContext) -> pb.Tool:
        tool = parse_tool_name(request.tool.name, "tool.name")
        change = change_from_pb(request)
        return tool_pb(await self.tools.update(caller(context), tool, change, request.tool.etag))

    async def DeleteTool(
        self, request: pb.DeleteToolRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self.tools.delete(caller(context), parse_tool_name(request.name, "name"), request.etag)
        return empty_pb2.Empty()


INTERNAL_TOKEN_HEADER = "x-corral-internal-token"


class ToolSecretsServicer(tools_pb2_grpc.ToolSecretsServiceServicer):
    """Internal: the executor's broker resolves tools here, proving itself with the deployment's
    internal token (CORRAL_INTERNAL_TOKEN, shared by registries and executors only). Not routed
    by Envoy either."""

    def __init__(self, tools: Tools, internal_token: str) -> None:
        self.tools = tools
        self.internal_token = internal_token

    async def ResolveTool(
        self, request: pb.ResolveToolRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolvedTool:
        presented = dict(context.invocation_metadata() or ()).get(INTERNAL_TOKEN_HEADER, "")
        if not self.internal_token:
            raise PermissionDenied(
                "ResolveTool is for executors only, and this registry has no CORRAL_INTERNAL_TOKEN "
                "to recognise them by; set the same one on registries and executors")
        if not isinstance(presented, str) or not hmac.compare_digest(
            presented.encode(), self.internal_token.encode()
        ):
            raise PermissionDenied("ResolveTool is for executors only (bad or missing internal token)")
        if not request.tenant:
            raise InvalidArgument.field("tenant", "required: the tenant whose tool to resolve")
        record, secret = await self.tools.resolve(request.tenant, check_tool_id(request.tool, "tool"))
        return pb.ResolvedTool(tool=tool_pb(record), secret=secret)
