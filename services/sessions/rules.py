"""Limits and input rules of the sessions service, and its page tokens: pure functions."""

from __future__ import annotations

import base64
import binascii
import math
import re
from datetime import UTC, datetime, timedelta

from corral import names
from services.common.errors import InvalidArgument
from services.sessions.model import NewSession, PageKey, SessionFilter

DEFAULT_IDLE_TIMEOUT_S = 900
DEFAULT_MAX_LIFETIME_S = 28_800
# Bounds the timeouts so they fit the columns and mean something; a year is already generous.
MAX_TIMEOUT_S = 365 * 24 * 3600
MAX_STATE_BYTES = 8 * 1024 * 1024
MAX_TURN_PAYLOAD_BYTES = 8 * 1024 * 1024
DEFAULT_LEASE_TTL_S = 30.0
MAX_LEASE_TTL_S = 3600.0
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TOKEN_VERSION = "v1"


def encode_page_token(key: PageKey) -> str:
    stamp = key[0].astimezone(UTC)
    micros = (stamp - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    raw = f"{_TOKEN_VERSION}:{micros}:{key[1]}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> PageKey:
    def bad() -> InvalidArgument:
        return InvalidArgument.field(
            "page_token",
            "is not a token this service returned; pass next_page_token unchanged, "
            "or leave it empty for the first page",
        )

    try:
        padded = token + "=" * (-len(token) % 4)
        raw = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
        version, micros, session_id = raw.split(":", 2)
        stamp = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(micros))
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
        raise bad() from None
    if version != _TOKEN_VERSION or not names.valid_session_id(session_id):
        raise bad()
    return stamp, session_id


def session_id_of(name: str, field: str) -> str:
    try:
        return names.parse_session(name)
    except names.ResourceNameError as exc:
        raise InvalidArgument.field(field, str(exc)) from None


def timeout_seconds(value: float | None, field: str, default: int) -> int:
    if value is None or value == 0:
        return default
    if value < 1 or value > MAX_TIMEOUT_S:
        raise InvalidArgument.field(
            field,
            f"{value:g}s is out of range: use between 1s and {MAX_TIMEOUT_S}s, "
            f"or leave it unset for {default}s",
        )
    return math.ceil(value)


def lease_ttl(value: float | None) -> float:
    if value is None or value == 0:
        return DEFAULT_LEASE_TTL_S
    if value < 0 or value > MAX_LEASE_TTL_S:
        raise InvalidArgument.field(
            "ttl",
            f"{value:g}s is out of range: use up to {MAX_LEASE_TTL_S:g}s, "
            f"or leave it unset for {DEFAULT_LEASE_TTL_S:g}s",
        )
    return value


def check_state_size(state: bytes) -> None:
    if len(state) > MAX_STATE_BYTES:
        raise InvalidArgument.field(
            "state",
            f"is {len(state)} bytes, over the limit of {MAX_STATE_BYTES} bytes (8 MiB); "
            "keep large data elsewhere and store a reference to it",
        )


def validate_new_session(session_id: str, spec: NewSession) -> None:
    """Every check CreateSession makes before it writes anything."""
    if session_id and not names.valid_session_id(session_id):
        raise InvalidArgument.field(
            "session_id",
            f"{session_id!r} must be 1-128 letters, digits, '-', '_', '.' or ':' starting "
            "with a letter or digit, or empty to have one generated",
        )
    if not spec.agent:
        raise InvalidArgument.field("session.agent", "is required (agents/{agent})")
    try:
        agent = names.parse_agent(spec.agent)
    except names.ResourceNameError as exc:
        raise InvalidArgument.field("session.agent", str(exc)) from None
    if not spec.version:
        raise InvalidArgument.field("session.version", "is required (agents/{agent}/versions/{n})")
    try:
        version = names.parse_version(spec.version)
    except names.ResourceNameError as exc:
        raise InvalidArgument.field("session.version", str(exc)) from None
    if version.agent != agent:
        raise InvalidArgument.field(
            "session.version", f"{spec.version!r} is a version of another agent than {spec.agent!r}"
        )
    if not _DIGEST.match(spec.version_digest):
        raise InvalidArgument.field(
            "session.version_digest",
            f"{spec.version_digest!r} must be the version's digest, sha256:<64 hex digits>",
        )
    if spec.endpoint:
        try:
            endpoint_agent, _ = names.parse_endpoint(spec.endpoint)
        except names.ResourceNameError as exc:
            raise InvalidArgument.field("session.endpoint", str(exc)) from None
        if endpoint_agent != agent:
            raise InvalidArgument.field(
                "session.endpoint",
                f"{spec.endpoint!r} is an endpoint of another agent than {spec.agent!r}",
            )


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument.field(
            "page_size", f"{value} is negative; use 1-{MAX_PAGE_SIZE}, or 0 for {DEFAULT_PAGE_SIZE}"
        )
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def validate_filter(where: SessionFilter) -> None:
    if where.agent:
        try:
            names.parse_agent(where.agent)
        except names.ResourceNameError as exc:
            raise InvalidArgument.field("agent", str(exc)) from None
    if where.version:
        try:
            names.parse_version(where.version)
        except names.ResourceNameError as exc:
            raise InvalidArgument.field("version", str(exc)) from None
