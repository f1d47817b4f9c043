"""The registry's tenancy rules (services/registry/tenancy.py): the tenant each kind of caller acts
in, what a service acting for every tenant may see, who may download bundles."""

from __future__ import annotations

import pytest

from services.common.auth.principal import Principal, Role
from services.common.errors import PermissionDenied
from services.registry import tenancy

ALICE = Principal("acme", "alice", frozenset({Role.OPERATOR}))


def test_a_person_acts_and_reads_in_their_own_tenant() -> None:
    assert tenancy.tenant_of(ALICE) == tenancy.visible_tenant(ALICE) == "acme"
    assert tenancy.bundle_tenant(ALICE) == "acme"


def test_a_service_acts_in_the_tenant_it_names() -> None:
    router = Principal.of_service("router", "acme")
    assert tenancy.tenant_of(router) == tenancy.visible_tenant(router) == "acme"
    assert tenancy.bundle_tenant(Principal.of_service("executor", "acme")) == "acme"


def test_a_service_for_every_tenant_reads_across_them_but_names_a_tenant_for_one_resource() -> None:
    router = Principal.of_service("router")
    assert tenancy.visible_tenant(router) is None
    with pytest.raises(PermissionDenied) as refused:
        tenancy.tenant_of(router)
    assert refused.value.reason == "TENANT_REQUIRED"
    assert tenancy.bundle_tenant(Principal.of_service("executor")) is None


@pytest.mark.parametrize("tenant", ["", "acme"])
def test_only_executors_among_services_download_bundles(tenant: str) -> None:
    with pytest.raises(PermissionDenied) as refused:
        tenancy.bundle_tenant(Principal.of_service("router", tenant))
    assert refused.value.reason == "BUNDLE_DOWNLOAD_DENIED"


def test_the_registry_acts_for_a_tenant_as_itself() -> None:
    acting = tenancy.acting_for("acme")
    assert acting.is_service and acting.service == "registry" and acting.tenant == "acme"
    assert acting.describe() == "service:registry"
