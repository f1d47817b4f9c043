"""Who may see and change a session, as pure rules over a verified principal (no grpc).

A session belongs to one tenant and one user. In its tenant a VIEWER reads every session (and so
does every higher role: roles are ordered), an INVOKER also changes and converses in its own, and
an OPERATOR (or above) changes every session. A Corral service with no tenant acts for every
tenant. Another tenant's session does not exist for the caller (NOT_FOUND, so that existence does
not leak); one of the caller's own tenant that its roles do not reach is PERMISSION_DENIED."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.common.auth.principal import Principal, Role
from services.common.errors import InvalidArgument, NotFound, PermissionDenied


@dataclass(frozen=True)
class SessionOwner:
    """The tenant a session belongs to, and the user who started it."""

    tenant: str
    user: str


class Access(enum.Enum):
    READ = "read"
    WRITE = "change"


class Verdict(enum.Enum):
    ALLOWED = "allowed"
    # Another tenant's: as if there were no such session.
    NOT_FOUND = "not_found"
    # The caller's tenant's, but beyond its roles.
    PERMISSION_DENIED = "permission_denied"


def for_every_tenant(principal: Principal) -> bool:
    """A service calling as itself, for no tenant in particular."""
    return principal.is_service and not principal.tenant


def manages_sessions(principal: Principal) -> bool:
    """Whether the caller changes every session of its tenant, not only its own."""
    return principal.is_service or principal.can(Role.OPERATOR)


def session_verdict(principal: Principal, owner: SessionOwner, access: Access) -> Verdict:
    """Whether `principal` may read or change the session `owner` has."""
    if for_every_tenant(principal):
        return Verdict.ALLOWED
    if owner.tenant != principal.tenant:
        return Verdict.NOT_FOUND
    if manages_sessions(principal):
        return Verdict.ALLOWED
    if access is Access.READ and principal.can(Role.VIEWER):
        return Verdict.ALLOWED
    if principal.can(Role.INVOKER) and owner.user == principal.user:
        return Verdict.ALLOWED
    return Verdict.PERMISSION_DENIED


def check_session(principal: Principal, owner: SessionOwner, access: Access, name: str) -> None:
    """Raises NotFound for another tenant's session `name`, PermissionDenied for one of the
    caller's tenant that its roles do not let it read or change."""
    verdict = session_verdict(principal, owner, access)
    if verdict is Verdict.NOT_FOUND:
        raise not_found(name)
    if verdict is Verdict.PERMISSION_DENIED:
        raise PermissionDenied(
            f"{principal.describe()} may not {access.value} {name}: "
            + ("it is another user's session, which only an operator may change"
               if principal.can(Role.INVOKER) else
               f"that needs the {_needed(access).label} role in tenant {principal.tenant!r}"),
            metadata={"session": name},
        )


def _needed(access: Access) -> Role:
    return Role.VIEWER if access is Access.READ else Role.INVOKER


def not_found(name: str) -> NotFound:
    """What another tenant's session looks like: the same error as no session at all."""
    return NotFound(f"{name} not found; create it with CreateSession")


def acting_tenant(principal: Principal) -> str:
    """The tenant a call about one session runs in. A service acting for every tenant names none,
    and so cannot address one tenant's session."""
    if not principal.tenant:
        raise InvalidArgument(
            f"{principal.describe()} acts for no tenant: a session is addressed within one, so "
            "call in the name of the tenant (or of its user) the session belongs to"
        )
    return principal.tenant


def tenant_scope(principal: Principal) -> str | None:
    """The tenant whose data a call may touch: the caller's, or every tenant's (None) for a
    service acting for all."""
    return None if for_every_tenant(principal) else principal.tenant


def readable_tenant(principal: Principal, what: str) -> str | None:
    """Whose `what` (sessions, spans, scores...) a read or listing may return: the caller's
    tenant's, or every tenant's (None) for a service acting for all. Reading needs VIEWER."""
    if for_every_tenant(principal):
        return None
    if not (principal.is_service or principal.can(Role.VIEWER)):
        raise PermissionDenied(
            f"{principal.describe()} may not read {what}: that needs the viewer role in tenant "
            f"{principal.tenant!r}"
        )
    return principal.tenant
