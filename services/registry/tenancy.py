"""Whose resources a caller acts on. A person or script acts in its own tenant, and another
tenant's resource does not exist for it (NOT_FOUND, so names do not leak). A Corral service acts
in the tenant it names, or, naming none, for every tenant where a method needs that (the
router's and executors' endpoint watch); a single resource it must name the tenant of."""

from __future__ import annotations

from services.common.auth.principal import Principal
from services.common.errors import PermissionDenied

# The services that download bundles, besides the tenant's own people: executors start them.
BUNDLE_READERS = frozenset({"executor"})
# How the registry names itself when it acts on a tenant's resources (rollout steps, analyses).
REGISTRY_SERVICE = "registry"


def tenant_of(principal: Principal) -> str:
    """The one tenant `principal` acts in."""
    if not principal.tenant:
        raise PermissionDenied(
            f"{principal.describe()} acts for every tenant; name the tenant of the resource "
            "(call as the service acting in that tenant)",
            reason="TENANT_REQUIRED",
        )
    return principal.tenant


def visible_tenant(principal: Principal) -> str | None:
    """The tenant whose resources a listing or watch shows `principal`; None for every tenant,
    which only a service acting for every tenant sees."""
    if principal.is_service and not principal.tenant:
        return None
    return tenant_of(principal)


def bundle_tenant(principal: Principal) -> str | None:
    """The tenant whose bundles `principal` may download: a person's own, or the one an
    executor names; None for an executor acting for every tenant, which reads any bundle by
    its digest. Other services have no use for agent code."""
    if principal.is_service and principal.service not in BUNDLE_READERS:
        raise PermissionDenied(
            f"{principal.describe()} may not download bundles (only their tenant and executors)",
            reason="BUNDLE_DOWNLOAD_DENIED",
        )
    return visible_tenant(principal)


def acting_for(tenant: str) -> Principal:
    """The registry itself acting on a resource of `tenant`: what it audits and calls as."""
    return Principal.of_service(REGISTRY_SERVICE, tenant=tenant)
