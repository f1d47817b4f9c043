"""Limits and input rules of the sessions service, beyond the shape of names (the servicer parses
those): pure functions."""

from __future__ import annotations

import math
from collections.abc import Sequence

from corral.names import VersionRef
from services.common.errors import InvalidArgument
from services.sessions.model import NewSession, Turn

DEFAULT_IDLE_TIMEOUT_S = 900
DEFAULT_MAX_LIFETIME_S = 28_800
# Bounds the timeouts so they fit the columns and mean something; a year is already generous.
MAX_TIMEOUT_S = 365 * 24 * 3600
MAX_STATE_BYTES = 8 * 1024 * 1024
MAX_TURN_PAYLOAD_BYTES = 8 * 1024 * 1024
DEFAULT_LEASE_TTL_S = 30.0
MAX_LEASE_TTL_S = 3600.0


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


def require_lease_id(lease_id: str) -> None:
    if not lease_id:
        raise InvalidArgument.field(
            "lease_id", "is required: pass the lease_id AcquireLease returned"
        )


def check_state_size(state: bytes) -> None:
    if len(state) > MAX_STATE_BYTES:
        raise InvalidArgument.field(
            "state",
            f"is {len(state)} bytes, over the limit of {MAX_STATE_BYTES} bytes (8 MiB); "
            "keep large data elsewhere and store a reference to it",
        )


def check_turn(turn: Turn) -> None:
    for field, payload in (("input", turn.input), ("output", turn.output)):
        if len(payload) > MAX_TURN_PAYLOAD_BYTES:
            raise InvalidArgument.field(
                field,
                f"is {len(payload)} bytes, over the limit of {MAX_TURN_PAYLOAD_BYTES} bytes "
                "(8 MiB)",
            )


def check_pin(spec: NewSession) -> None:
    """The version and the endpoint a new session is pinned to are its agent's."""
    if spec.pin.version.parent != spec.agent:
        raise InvalidArgument.field(
            "session.version",
            f"{spec.pin.version.name!r} is a version of another agent than {spec.agent.name!r}",
        )
    if spec.endpoint is not None and spec.endpoint.parent != spec.agent:
        raise InvalidArgument.field(
            "session.endpoint",
            f"{spec.endpoint.name!r} is an endpoint of another agent than {spec.agent.name!r}",
        )


def check_pinned_query(versions: Sequence[VersionRef]) -> None:
    """CountPinnedSessions asks about at least one version."""
    if not versions:
        raise InvalidArgument.field("versions", "name at least one version")
