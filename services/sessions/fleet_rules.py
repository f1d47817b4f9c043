"""Pure rules of the executor fleet: what a heartbeat may say, who may manage the fleet, and
when a session's lease passes from one executor to another."""

from __future__ import annotations

from services.common.auth.principal import Principal
from services.common.errors import InvalidArgument, PermissionDenied
from services.common.fleet import EXECUTOR_NAME, EXECUTOR_PREFIX

# Heartbeats come about every second; a member is out of the fleet this long after its last.
HEARTBEAT_TTL_S = 3.0
MAX_WARM_VERSIONS = 256


def executor_name(value: str, field: str) -> str:
    """The bare name in `executors/{name}`."""
    name = value.removeprefix(EXECUTOR_PREFIX)
    if not value.startswith(EXECUTOR_PREFIX) or not EXECUTOR_NAME.match(name):
        raise InvalidArgument.field(
            field, f"{value[:120]!r} is not an executor name: use executors/NAME, NAME of "
            "lower-case letters, digits, '-' and '.' (at most 100)"
        )
    return name


def check_beat(address: str, capacity: int, in_use: int, warm_versions: int) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument.field("executor.address", f"{address[:120]!r} is not host:port")
    if capacity < 1:
        raise InvalidArgument.field("executor.capacity", f"{capacity} must be at least 1")
    if in_use < 0:
        raise InvalidArgument.field("executor.sandboxes_in_use", f"{in_use} must not be negative")
    if warm_versions > MAX_WARM_VERSIONS:
        raise InvalidArgument.field(
            "executor.warm_versions", f"{warm_versions} is over the limit of {MAX_WARM_VERSIONS}")


def check_manager(principal: Principal, action: str) -> None:
    """The fleet is the platform's, not a tenant's: only a platform administrator (or a Corral
    service) sees or drains it."""
    if not (principal.is_service or principal.platform_admin):
        raise PermissionDenied(
            f"{principal.describe()} may not {action}: the executor fleet is managed by a "
            "platform administrator (the key `make run` keeps in .corral/admin.key)",
            reason="PLATFORM_ADMIN_REQUIRED",
        )


def takes_over(
    *, holder: str, requester: str, placed_on: str, holder_live: bool, holder_draining: bool
) -> bool:
    """Whether `requester` may take a session's lease that `holder` has. The session's turns go
    to `placed_on` (its recorded executor, "" for none), so a lease held anywhere else is left
    over from before the session moved. Not taken: the lease of a live, undrained executor
    that the session is still placed on, or that a requester the session is not placed on asks
    for (it would run a turn beside the one that may be running there)."""
    if holder == requester:
        return True  # the same executor, restarted: its old process's sandbox is gone
    if not holder_live or holder_draining:
        return True
    return bool(placed_on) and placed_on == requester
