"""API keys as values: a key's record (its secret only as a hash), what a create asks for, and
which keys a listing wants; and the store the keys domain is built on."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from services.common.auth.principal import CredentialKind, Principal, Role
from services.common.paging import Key
from services.registry.model import AuditWrites

# Every tenant, in a listing (platform administrators only).
EVERY_TENANT = "-"


@dataclass(frozen=True)
class KeyDraft:
    """A key as CreateKey carries it, before the rules check it: the role as its number (0 when
    unset), an expiration as a time or a time to live (None when unset)."""

    tenant: str = ""
    display_name: str = ""
    role: int = 0
    platform_admin: bool = False
    expire_time: datetime | None = None
    ttl: timedelta | None = None


@dataclass(frozen=True)
class KeySpec:
    """A key to create, once the rules have checked it."""

    tenant: str
    display_name: str  # "" to generate one from the key's id
    role: Role
    platform_admin: bool = False
    expire_time: datetime | None = None


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant: str
    display_name: str
    role: Role
    platform_admin: bool
    secret_hash: bytes = field(repr=False)
    creator: str
    create_time: datetime
    expire_time: datetime | None
    last_use_time: datetime | None
    revoke_time: datetime | None

    @property
    def name(self) -> str:
        return f"keys/{self.id}"

    def expired(self, now: datetime) -> bool:
        return self.expire_time is not None and self.expire_time <= now

    def principal(self) -> Principal:
        """Who a call presenting this key acts as."""
        return Principal(
            tenant=self.tenant, subject=f"key:{self.display_name}", roles=frozenset({self.role}),
            kind=CredentialKind.API_KEY, credential=self.id, platform_admin=self.platform_admin,
        )


@dataclass(frozen=True)
class KeyListing:
    """Which keys a ListKeys call wants: a tenant's (or EVERY_TENANT's), revoked ones too or not."""

    tenant: str
    show_revoked: bool = False


class KeyReads(Protocol):
    async def get_key(self, key_id: str) -> KeyRecord | None:
        """The key with this id, whatever its tenant."""
        ...

    async def find_key(
        self, tenant: str, key_id: str = "", display_name: str = "", *, for_update: bool = False
    ) -> KeyRecord | None:
        """The tenant's key with this id, or its live key with this display name."""
        ...


class KeyTx(KeyReads, AuditWrites, Protocol):
    async def insert_key(
        self, key_id: str, spec: KeySpec, display_name: str, secret_hash: bytes, creator: str,
        now: datetime,
    ) -> KeyRecord | None:
        """The new key, or None when a live key of the tenant has the display name."""
        ...

    async def revoke_key(self, key_id: str, now: datetime) -> KeyRecord:
        """Revoked at `now`, unless it was already."""
        ...

    async def release_expired_name(self, tenant: str, display_name: str, now: datetime) -> int: ...


class KeyStore(KeyReads, Protocol):
    def tx(self) -> AbstractAsyncContextManager[KeyTx]: ...

    async def list_keys(self, listing: KeyListing, after: Key | None, limit: int) -> list[KeyRecord]:
        """By creation time, then id."""
        ...

    async def record_use(self, key_id: str, now: datetime, interval: timedelta) -> None:
        """Sets the key's last use to `now` unless it was set less than `interval` before."""
        ...
