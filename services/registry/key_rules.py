"""Rules of API keys, pure: names and expirations as requests give them, who may manage whose
keys and grant which role, when a key is refused, and how often its use is written down."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.common.auth.apikeys import is_key_id
from services.common.auth.principal import Principal, Role, check_name
from services.common.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from services.registry.key_model import EVERY_TENANT, KeyDraft, KeyRecord, KeySpec

MAX_TTL = timedelta(days=3650)
# A key's use is written at most this often: verifying is on every call's path.
USE_RECORD_INTERVAL = timedelta(minutes=1)
_DISPLAY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
BOOTSTRAP_NAME = "bootstrap-admin"


def check_display_name(name: str, field: str = "key.display_name") -> str:
    if name and not _DISPLAY_NAME.fullmatch(name):
        raise InvalidArgument.field(
            field, f"{name!r} is not a key name: start with a letter or digit; letters, digits, "
            ". _ -; at most 63 characters (or leave it empty for a generated one)")
    return name


def generated_name(key_id: str) -> str:
    """A name for a key created without one: unique, as its id is."""
    return f"key-{key_id}"


def check_role(role: int, field: str = "key.role") -> Role:
    try:
        return Role(role)
    except ValueError:
        names = ", ".join(r.label for r in Role)
        raise InvalidArgument.field(field, f"required: one of {names}") from None


def expire_time(
    now: datetime, at: datetime | None, ttl: timedelta | None, field: str = "key"
) -> datetime | None:
    """When a new key expires: at `at`, or `ttl` from now, or never (both None)."""
    if ttl is not None:
        if ttl <= timedelta(0) or ttl > MAX_TTL:
            raise InvalidArgument.field(f"{field}.ttl", f"must be more than 0 and at most {MAX_TTL.days} days")
        return now + ttl
    if at is not None:
        if at <= now:
            raise InvalidArgument.field(f"{field}.expire_time", f"{at.isoformat()} is not in the future")
        if at - now > MAX_TTL:
            raise InvalidArgument.field(f"{field}.expire_time", f"must be at most {MAX_TTL.days} days away")
    return at


def key_spec(who: Principal, draft: KeyDraft, now: datetime) -> KeySpec:
    """The key a CreateKey asks for, each field checked."""
    return KeySpec(
        tenant=target_tenant(who, draft.tenant),
        display_name=check_display_name(draft.display_name),
        role=check_role(draft.role),
        platform_admin=draft.platform_admin,
        expire_time=expire_time(now, draft.expire_time, draft.ttl),
    )


def target_tenant(who: Principal, requested: str, *, listing: bool = False) -> str:
    """The tenant a request is about: the one it names, else the caller's own ("-", every
    tenant, only in a listing)."""
    if not requested:
        return who.tenant
    if listing and requested == EVERY_TENANT:
        return requested
    return check_name(requested, "tenant")


def check_manage(who: Principal, tenant: str, method: str) -> None:
    """Keys are managed by their tenant's admins and by platform administrators. For another
    tenant the answer is PERMISSION_DENIED here (a tenant is not a secret); a key of another
    tenant is NOT_FOUND (see key_not_found)."""
    if who.platform_admin:
        return
    if tenant != who.tenant:
        raise PermissionDenied(
            f"{method}: {who.describe()} acts in tenant {who.tenant!r} and may manage only its "
            f"keys, not those of {tenant!r}", reason="OTHER_TENANT")
    if not who.can(Role.ADMIN):
        raise PermissionDenied(
            f"{method} needs the admin role in tenant {tenant!r}; {who.describe()} has "
            f"{_roles(who)}", reason="ROLE_TOO_LOW")


def check_grant(who: Principal, spec: KeySpec) -> None:
    """No one hands out more than they hold: a role above the creator's own, or a platform
    administrator's key, only from a platform administrator."""
    if who.platform_admin:
        return
    if spec.platform_admin:
        raise PermissionDenied("only a platform administrator may create a platform "
                               "administrator's key", reason="PLATFORM_ADMIN_ONLY")
    if not who.can(spec.role):
        raise PermissionDenied(
            f"key.role: {spec.role.label} is above the role of {who.describe()} ({_roles(who)}); "
            "a key may have at most its creator's role", reason="ROLE_TOO_HIGH")


def _roles(who: Principal) -> str:
    return ", ".join(sorted(r.label for r in who.roles)) or "no role"


@dataclass(frozen=True)
class KeyLookup:
    """What RevokeKey names: a key by id, or a live key by its display name."""

    id: str = ""
    display_name: str = ""

    def describe(self) -> str:
        return f"keys/{self.id}" if self.id else f"key {self.display_name!r}"


def key_lookup(text: str, field: str = "name") -> KeyLookup:
    if not text:
        raise InvalidArgument.field(field, "required: keys/{id}, the key's id, or its name")
    if text.startswith("crl_"):
        raise InvalidArgument.field(field, "give the key's id or name, not the key itself")
    bare = text.removeprefix("keys/")
    if is_key_id(bare):
        return KeyLookup(id=bare)
    if bare != text:
        raise InvalidArgument.field(field, f"{text!r}: a key's id is 16 characters a-z and 2-7")
    return KeyLookup(display_name=check_display_name(text, field))


def key_not_found(lookup: KeyLookup, tenant: str) -> NotFound:
    # The same answer whether another tenant has the key or nobody does.
    return NotFound(f"tenant {tenant!r} has no {lookup.describe()}; `corral keys list` shows its keys")


def refusal(record: KeyRecord, now: datetime) -> Unauthenticated | None:
    """Why a key whose secret matched may not be used, if it may not."""
    label = f"API key {record.display_name!r} ({record.name})"
    if record.revoke_time is not None:
        return Unauthenticated(
            f"{label} was revoked at {record.revoke_time.isoformat(timespec='seconds')}; "
            "ask an admin of the tenant for a new one", reason="API_KEY_REVOKED")
    if record.expired(now):
        assert record.expire_time is not None
        return Unauthenticated(
            f"{label} expired at {record.expire_time.isoformat(timespec='seconds')}; "
            "ask an admin of the tenant for a new one", reason="API_KEY_EXPIRED")
    return None


def use_due(last_use: datetime | None, now: datetime) -> bool:
    """Whether a use at `now` is to be written down (at most one write per key a minute)."""
    return last_use is None or now - last_use >= USE_RECORD_INTERVAL
