"""The tenancy rules for sessions as a table: who reads, who changes, and what another tenant
sees (NOT_FOUND, never PERMISSION_DENIED)."""

from __future__ import annotations

import pytest

from services.common.auth.principal import Principal, Role
from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.common.tenancy import (
    Access,
    SessionOwner,
    Verdict,
    acting_tenant,
    check_session,
    readable_tenant,
    session_verdict,
)

ALICES = SessionOwner("acme", "alice")
R, W = Access.READ, Access.WRITE
ALLOWED, NOT_FOUND, DENIED = Verdict.ALLOWED, Verdict.NOT_FOUND, Verdict.PERMISSION_DENIED


def member(user: str, *roles: Role, tenant: str = "acme") -> Principal:
    return Principal(tenant=tenant, subject=user, roles=frozenset(roles))


@pytest.mark.parametrize(
    ("principal", "read", "write"),
    [
        (member("alice", Role.INVOKER), ALLOWED, ALLOWED),
        (member("bob", Role.INVOKER), ALLOWED, DENIED),
        (member("vera", Role.VIEWER), ALLOWED, DENIED),
        (member("alice", Role.VIEWER), ALLOWED, DENIED),
        (member("olga", Role.OPERATOR), ALLOWED, ALLOWED),
        (member("adam", Role.ADMIN), ALLOWED, ALLOWED),
        (member("nobody"), DENIED, DENIED),
        # Another tenant, whatever its roles and even under the same user name.
        (member("alice", Role.ADMIN, tenant="beta"), NOT_FOUND, NOT_FOUND),
        (Principal.of_service("executor", tenant="beta"), NOT_FOUND, NOT_FOUND),
        (Principal.of_service("executor", tenant="acme"), ALLOWED, ALLOWED),
        (Principal.of_service("registry"), ALLOWED, ALLOWED),
    ],
)
def test_who_reads_and_changes_a_session(
    principal: Principal, read: Verdict, write: Verdict
) -> None:
    verdicts = (session_verdict(principal, ALICES, R), session_verdict(principal, ALICES, W))
    assert verdicts == (read, write)


def test_another_tenant_sees_what_a_missing_session_looks_like() -> None:
    with pytest.raises(NotFound) as info:
        check_session(member("alice", Role.ADMIN, tenant="beta"), ALICES, R, "sessions/s1")
    assert info.value.message == "sessions/s1 not found; create it with CreateSession"
    with pytest.raises(PermissionDenied, match="only an operator may change"):
        check_session(member("bob", Role.INVOKER), ALICES, W, "sessions/s1")
    with pytest.raises(PermissionDenied, match="needs the viewer role in tenant 'acme'"):
        check_session(member("nobody"), ALICES, R, "sessions/s1")


def test_reads_cover_the_callers_tenant_or_every_tenant_for_a_service() -> None:
    assert readable_tenant(member("vera", Role.VIEWER), "spans") == "acme"
    assert readable_tenant(Principal.of_service("registry"), "spans") is None
    assert readable_tenant(Principal.of_service("registry", tenant="acme"), "spans") == "acme"
    with pytest.raises(PermissionDenied, match="may not read spans"):
        readable_tenant(member("nobody"), "spans")
    assert acting_tenant(member("vera", Role.VIEWER)) == "acme"
    with pytest.raises(InvalidArgument, match="acts for no tenant"):
        acting_tenant(Principal.of_service("registry"))
