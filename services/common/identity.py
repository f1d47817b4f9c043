"""Who is calling: the principal the authentication interceptor verified for this call.

Transitional: until the interceptor lands, the principal is read from two request headers."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from services.common.auth.principal import DEFAULT_TENANT, CredentialKind, Principal, Role
from services.common.errors import InvalidArgument

if TYPE_CHECKING:
    from services.common.interceptors import Context

# Services read the principal through this name.
Caller = Principal

TENANT_KEY = "x-corral-tenant"
USER_KEY = "x-corral-user"
SERVICE_KEY = "x-corral-service"
ANONYMOUS = "anonymous"
_VALID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


def caller_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
    values = {k: v for k, v in (metadata or ()) if k in (TENANT_KEY, USER_KEY, SERVICE_KEY)}
    if values.get(SERVICE_KEY):
        return Principal.of_service(str(values[SERVICE_KEY]), str(values.get(TENANT_KEY) or ""))
    tenant = str(values.get(TENANT_KEY) or DEFAULT_TENANT)
    user = str(values.get(USER_KEY) or ANONYMOUS)
    for key, value in ((TENANT_KEY, tenant), (USER_KEY, user)):
        if not _VALID.match(value):
            raise InvalidArgument.field(
                key, f"{value!r} is not a valid identity (letters, digits, . _ @ -, at most 128)"
            )
    return Principal(tenant=tenant, subject=user, roles=frozenset({Role.ADMIN}),
                     kind=CredentialKind.API_KEY, credential="header")


def caller(context: Context) -> Caller:
    return caller_from_metadata(context.invocation_metadata())


def metadata_of(principal: Principal) -> tuple[tuple[str, str], ...]:
    """Metadata that carries `principal` on a call to another service."""
    if principal.is_service:
        return ((SERVICE_KEY, principal.service), (TENANT_KEY, principal.tenant))
    return ((TENANT_KEY, principal.tenant), (USER_KEY, principal.subject))
