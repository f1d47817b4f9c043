"""API keys: issued to a tenant's people, scripts and CI, checked on every call. A key's secret
is shown once, when it is made, and kept only as a hash. Keys is also the registry's own
CredentialVerifier (verify), and what VerifyKey answers other services with."""

from __future__ import annotations

import logging
from datetime import datetime
from functools import partial

from services.common.auth import apikeys
from services.common.auth.apikeys import ApiKey, MalformedKey
from services.common.auth.principal import DEFAULT_TENANT, Principal, Role
from services.common.clock import Clock, SystemClock
from services.common.errors import AlreadyExists, Unauthenticated
from services.common.paging import Page
from services.registry import key_rules
from services.registry.key_model import KeyDraft, KeyListing, KeyRecord, KeySpec, KeyStore
from services.registry.key_rules import BOOTSTRAP_NAME, KeyLookup
from services.registry.model import Paging, read_page

log = logging.getLogger(__name__)
# Who makes the bootstrap administrator's key, in the audit log.
REGISTRY = Principal.of_service("registry")


def _unknown() -> Unauthenticated:
    # One answer for an unknown id and a wrong secret: the id alone is public.
    return Unauthenticated("unknown API key (revoked keys are refused by name; is this one "
                           "from another Corral?)", reason="API_KEY_UNKNOWN")


class Keys:
    def __init__(self, store: KeyStore, clock: Clock | None = None) -> None:
        self._store = store
        self._clock = clock or SystemClock()

    async def create(self, who: Principal, draft: KeyDraft) -> tuple[KeyRecord, ApiKey]:
        """A new key, and the key itself (the only time its secret exists outside a hash)."""
        spec = key_rules.key_spec(who, draft, self._clock.now())
        key_rules.check_manage(who, spec.tenant, "CreateKey")
        key_rules.check_grant(who, spec)
        return await self._insert(who, spec)

    async def _insert(
        self, who: Principal, spec: KeySpec, *, replace_live: bool = False
    ) -> tuple[KeyRecord, ApiKey]:
        key = apikeys.new_key()
        name = spec.display_name or key_rules.generated_name(key.id)
        now = self._clock.now()
        async with self._store.tx() as tx:
            await tx.release_expired_name(spec.tenant, name, now)
            if replace_live:
                holder = await tx.find_key(spec.tenant, display_name=name, for_update=True)
                if holder is not None:
                    await tx.revoke_key(holder.id, now)
                    await tx.audit(who, "RevokeKey", holder.name, {"tenant": holder.tenant,
                                                                    "replaced": True})
            record = await tx.insert_key(key.id, spec, name, key.secret_hash, who.describe(), now)
            if record is None:
                raise AlreadyExists(
                    f"tenant {spec.tenant!r} has a live key named {name!r}; choose another name, "
                    f"or revoke it first (`corral keys revoke {name} --tenant {spec.tenant}`)")
            await tx.audit(who, "CreateKey", record.name, {
                "tenant": record.tenant, "display_name": name, "role": record.role.label,
                "platform_admin": record.platform_admin,
                "expire_time": record.expire_time.isoformat() if record.expire_time else None,
            })
        log.info("created %s (%r, %s) in tenant %s", record.name, name, spec.role.label, spec.tenant)
        return record, key

    async def list_keys(self, paging: Paging, listing: KeyListing) -> Page[KeyRecord]:
        key_rules.check_manage(paging.who, listing.tenant, "ListKeys")
        rows = partial(self._store.list_keys, listing)
        return await read_page(paging, "ListKeys", listing, (datetime, str), rows,
                               key=lambda k: (k.create_time, k.id))

    async def revoke(self, who: Principal, requested_tenant: str, lookup: KeyLookup) -> KeyRecord:
        """Revokes the key `lookup` names in the tenant requested (the caller's when ""; for a
        platform administrator naming a key by id, the key's own)."""
        tenant = key_rules.target_tenant(who, requested_tenant)
        if who.platform_admin and not requested_tenant and lookup.id:
            found = await self._store.get_key(lookup.id)
            tenant = found.tenant if found is not None else tenant
        if not who.platform_admin and tenant != who.tenant:
            raise key_rules.key_not_found(lookup, tenant)
        key_rules.check_manage(who, tenant, "RevokeKey")
        async with self._store.tx() as tx:
            record = await tx.find_key(tenant, lookup.id, lookup.display_name, for_update=True)
            if record is None:
                raise key_rules.key_not_found(lookup, tenant)
            if record.revoke_time is not None:
                return record
            record = await tx.revoke_key(record.id, self._clock.now())
            await tx.audit(who, "RevokeKey", record.name, {"tenant": record.tenant,
                                                           "display_name": record.display_name})
        log.info("revoked %s (%r) of tenant %s", record.name, record.display_name, tenant)
        return record

    async def verified(self, credential: str, *, record_use: bool = True) -> KeyRecord:
        """The record of a valid key; Unauthenticated naming why a key is not valid."""
        try:
            key = apikeys.parse_key(credential)
        except MalformedKey as exc:
            raise Unauthenticated(str(exc), reason="API_KEY_MALFORMED") from None
        record = await self._store.get_key(key.id)
        if record is None or not key.matches(record.secret_hash):
            raise _unknown()
        now = self._clock.now()
        refused = key_rules.refusal(record, now)
        if refused is not None:
            raise refused
        if record_use and key_rules.use_due(record.last_use_time, now):
            await self._store.record_use(record.id, now, key_rules.USE_RECORD_INTERVAL)
        return record

    async def verify(self, credential: str) -> Principal:
        """The registry's own API-key verifier (a CredentialVerifier)."""
        return (await self.verified(credential)).principal()

    async def ensure_bootstrap(self, current: str) -> ApiKey | None:
        """A new platform administrator's key (tenant default, named bootstrap-admin) unless
        `current` is a valid one; a bootstrap key made before is revoked."""
        if current:
            try:
                if (await self.verified(current, record_use=False)).platform_admin:
                    return None
            except Unauthenticated as exc:
                log.warning("the bootstrap administrator's key is not valid (%s); making a new one",
                            exc.message)
        spec = KeySpec(tenant=DEFAULT_TENANT, display_name=BOOTSTRAP_NAME, role=Role.ADMIN,
                       platform_admin=True)
        _record, key = await self._insert(REGISTRY, spec, replace_live=True)
        return key
