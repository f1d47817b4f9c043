"""Input rules of tools, pure: each failure names the request field it is about."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from services.common.errors import InvalidArgument
from services.common.outbound import OutboundRefused, Target, parse_grpc, parse_url
from services.registry.rules import update_paths
from services.registry.tool_model import ToolChange, ToolDraft, ToolKind, ToolSpec

DEFAULT_TIMEOUT_MS = 10_000
MAX_TIMEOUT_MS = 300_000
MAX_SECRET_CHARS = 4096
MAX_DESCRIPTION_CHARS = 1024
MAX_ADDRESS_CHARS = 2048
MUTABLE_FIELDS = ("kind", "address", "timeout", "description", "secret")
# A header / metadata value: printable ASCII, so it cannot break the request it rides in.
_SECRET = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$")
_KINDS: dict[str, ToolKind] = {"http": "http", "grpc": "grpc"}


def check_kind(kind: str, field: str) -> ToolKind:
    if kind not in _KINDS:
        raise InvalidArgument.field(field, "must be HTTP or GRPC")
    return _KINDS[kind]


def check_address(kind: ToolKind, address: str, field: str) -> str:
    if not address:
        what = "an http(s) URL" if kind == "http" else "host:port"
        raise InvalidArgument.field(field, f"required: {what} for a {kind.upper()} tool")
    if len(address) > MAX_ADDRESS_CHARS or any(c.isspace() for c in address):
        raise InvalidArgument.field(field, f"must be at most {MAX_ADDRESS_CHARS} characters, no spaces")
    if kind == "http":
        _check_url(address, field)
    destination(kind, address, field)  # a gRPC address: host:port, [IPv6]:port, dns:///host:port
    return address


def destination(kind: ToolKind, address: str, field: str) -> Target:
    """Where a tool's address points, as the outbound policy parses it (forms it does not
    understand, such as gRPC's `ipv4:` or `unix:` targets, are refused)."""
    try:
        return parse_url(address) if kind == "http" else parse_grpc(address)
    except OutboundRefused as exc:
        raise InvalidArgument.field(field, str(exc), reason="DESTINATION_NOT_ALLOWED") from None


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


def check_timeout(timeout_ns: int | None, field: str) -> int:
    """Milliseconds of a tool's timeout (rounded up), 10 s when unset."""
    if timeout_ns is None:
        return DEFAULT_TIMEOUT_MS
    if timeout_ns <= 0 or timeout_ns > MAX_TIMEOUT_MS * 1_000_000:
        raise InvalidArgument.field(field, f"must be more than 0 and at most {MAX_TIMEOUT_MS // 1000}s")
    return math.ceil(timeout_ns / 1_000_000)


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


def tool_spec(draft: ToolDraft) -> ToolSpec:
    """The spec of a new tool (its secret is checked apart: check_secret)."""
    kind = check_kind(draft.kind, "tool.kind")
    return ToolSpec(
        kind=kind,
        address=check_address(kind, draft.address, "tool.address"),
        timeout_ms=check_timeout(draft.timeout_ns, "tool.timeout"),
        description=check_description(draft.description, "tool.description"),
    )


def tool_change(draft: ToolDraft, mask: Sequence[str]) -> ToolChange:
    """The fields of `draft` that `mask` names; with no mask (AIP-134), every field the request
    populated."""
    populated = [name for name, present in (
        ("kind", bool(draft.kind)), ("address", bool(draft.address)),
        ("timeout", draft.timeout_ns is not None), ("description", bool(draft.description)),
        ("secret", bool(draft.secret)),
    ) if present]
    paths = update_paths(mask, MUTABLE_FIELDS, populated)
    return ToolChange(
        kind=check_kind(draft.kind, "tool.kind") if "kind" in paths else None,
        address=draft.address if "address" in paths else None,
        timeout_ms=check_timeout(draft.timeout_ns, "tool.timeout") if "timeout" in paths else None,
        description=check_description(draft.description, "tool.description")
        if "description" in paths else None,
        secret=check_secret(draft.secret, "tool.secret") if "secret" in paths else None,
    )


def merged_spec(spec: ToolSpec, change: ToolChange) -> ToolSpec:
    merged = ToolSpec(
        kind=change.kind if change.kind is not None else spec.kind,
        address=change.address if change.address is not None else spec.address,
        timeout_ms=change.timeout_ms if change.timeout_ms is not None else spec.timeout_ms,
        description=change.description if change.description is not None else spec.description,
    )
    # A new kind must come with an address of that kind (or keep one that fits it).
    check_address(merged.kind, merged.address, "tool.address")
    return merged


def check_secret_stays(before: ToolSpec, after: ToolSpec, has_secret: bool,
                       change: ToolChange) -> None:
    """A stored secret was given for one address: a tool moved to another must be given its
    secret again (or "" to drop it), so the secret never follows it somewhere else."""
    if has_secret and after.address != before.address and change.secret is None:
        raise InvalidArgument.field(
            "tool.secret",
            "required when the address changes: send the secret for the new address (or an empty "
            "secret named in update_mask, to remove it); the stored one is never sent to a new "
            "address",
        )


def check_tenant(tenant: str) -> str:
    if not tenant:
        raise InvalidArgument.field("tenant", "required: the tenant whose tool to resolve")
    return tenant
