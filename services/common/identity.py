"""Who is calling. Taken from request metadata until inbound authentication replaces this module."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common.errors import InvalidArgument

if TYPE_CHECKING:
    from services.common.interceptors import Context

TENANT_KEY = "x-corral-tenant"
USER_KEY = "x-corral-user"
DEFAULT_TENANT = "default"
ANONYMOUS = "anonymous"
_VALID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


@dataclass(frozen=True)
class Caller:
    tenant: str
    user: str

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata that carries this identity on a call to another service."""
        return ((TENANT_KEY, self.tenant), (USER_KEY, self.user))


def caller_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
    values = {k: v for k, v in (metadata or ()) if k in (TENANT_KEY, USER_KEY)}
    tenant = str(values.get(TENANT_KEY) or DEFAULT_TENANT)
    user = str(values.get(USER_KEY) or ANONYMOUS)
    for key, value in ((TENANT_KEY, tenant), (USER_KEY, user)):
        if not _VALID.match(value):
            raise InvalidArgument.field(
                key, f"{value!r} is not a valid identity (letters, digits, . _ @ -, at most 128)"
            )
    return Caller(tenant=tenant, user=user)


def caller(context: Context) -> Caller:
    return caller_from_metadata(context.invocation_metadata())
