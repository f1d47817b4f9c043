"""SQL for API keys: their records by id, by tenant and live name; revocation; last use."""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from services.common.auth.principal import Role
from services.common.paging import Key
from services.registry.key_model import EVERY_TENANT, KeyListing, KeyRecord, KeySpec
from services.registry.store.rows import Rows, key_part


def _key(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(
        id=row["id"], tenant=row["tenant"], display_name=row["display_name"],
        role=Role[row["role"].upper()], platform_admin=row["platform_admin"],
        secret_hash=bytes(row["secret_hash"]), creator=row["creator"],
        create_time=row["create_time"], expire_time=row["expire_time"],
        last_use_time=row["last_use_time"], revoke_time=row["revoke_time"],
    )


class KeyRows(Rows):
    async def get_key(self, key_id: str) -> KeyRecord | None:
        row = await self._db.fetchrow("SELECT * FROM registry.api_keys WHERE id = $1", key_id)
        return _key(row) if row else None

    async def find_key(
        self, tenant: str, key_id: str = "", display_name: str = "", *, for_update: bool = False
    ) -> KeyRecord | None:
        """The tenant's key with this id, or its live key with this display name."""
        lock = " FOR UPDATE" if for_update else ""
        row = await self._db.fetchrow(
            "SELECT * FROM registry.api_keys WHERE tenant = $1 AND "
            "(id = $2 OR ($2 = '' AND display_name = $3 AND revoke_time IS NULL))" + lock,
            tenant, key_id, display_name,
        )
        return _key(row) if row else None

    async def list_keys(
        self, listing: KeyListing, after: Key | None, limit: int
    ) -> list[KeyRecord]:
        rows = await self._db.fetch(
            """SELECT * FROM registry.api_keys
               WHERE ($1 = $2 OR tenant = $1) AND ($3 OR revoke_time IS NULL)
                 AND ($4::timestamptz IS NULL OR (create_time, id) > ($4, $5))
               ORDER BY create_time, id LIMIT $6""",
            listing.tenant, EVERY_TENANT, listing.show_revoked, key_part(after, 0),
            key_part(after, 1), limit,
        )
        return [_key(r) for r in rows]

    async def insert_key(
        self, key_id: str, spec: KeySpec, display_name: str, secret_hash: bytes, creator: str,
        now: datetime,
    ) -> KeyRecord | None:
        """The new key, or None when a live key of the tenant has the display name."""
        row = await self._db.fetchrow(
            """INSERT INTO registry.api_keys (id, tenant, display_name, role, platform_admin,
                   secret_hash, creator, create_time, expire_time)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
               ON CONFLICT (tenant, display_name) WHERE revoke_time IS NULL DO NOTHING
               RETURNING *""",
            key_id, spec.tenant, display_name, spec.role.label, spec.platform_admin, secret_hash,
            creator, now, spec.expire_time,
        )
        return _key(row) if row else None

    async def revoke_key(self, key_id: str, now: datetime) -> KeyRecord:
        row = await self._db.fetchrow(
            "UPDATE registry.api_keys SET revoke_time = coalesce(revoke_time, $2) WHERE id = $1 "
            "RETURNING *",
            key_id, now,
        )
        assert row is not None  # the caller read the key in this transaction
        return _key(row)

    async def release_expired_name(self, tenant: str, display_name: str, now: datetime) -> int:
        """Revokes the tenant's expired key holding `display_name`, so a new key can take the
        name; how many were."""
        status = await self._db.execute(
            "UPDATE registry.api_keys SET revoke_time = $3 WHERE tenant = $1 AND display_name = $2 "
            "AND revoke_time IS NULL AND expire_time <= $3",
            tenant, display_name, now,
        )
        return int(status.split()[-1])

    async def record_use(self, key_id: str, now: datetime, interval: timedelta) -> None:
        # Conditional, so replicas verifying the same key together write it once.
        await self._db.execute(
            "UPDATE registry.api_keys SET last_use_time = $2 WHERE id = $1 "
            "AND (last_use_time IS NULL OR last_use_time <= $2::timestamptz - $3::interval)",
            key_id, now, interval,
        )
