"""SQL for the audit log and for the request ids that make creates idempotent."""

from __future__ import annotations

import asyncpg

from services.common.identity import Caller
from services.common.paging import Key
from services.registry.model import AuditDetails, AuditRecord
from services.registry.store.json_forms import dumps, loads_object
from services.registry.store.rows import Rows, key_part


def _audit(row: asyncpg.Record) -> AuditRecord:
    return AuditRecord(
        row["id"], row["time"], row["tenant"], row["user"], row["method"], row["resource"],
        loads_object(row["details"]),
    )


class AuditRows(Rows):
    async def audit(
        self, who: Caller, method: str, resource: str, details: AuditDetails
    ) -> None:
        await self._db.execute(
            'INSERT INTO registry.audit_events (tenant, "user", method, resource, details) '
            "VALUES ($1, $2, $3, $4, $5)",
            who.tenant, who.describe(), method, resource, dumps(details),
        )

    async def list_audit(
        self, tenant: str, prefix: str, after: Key | None, limit: int
    ) -> list[AuditRecord]:
        rows = await self._db.fetch(
            "SELECT * FROM registry.audit_events WHERE tenant = $1 AND resource LIKE $2 || '%' "
            "AND ($3::bigint IS NULL OR id < $3) ORDER BY id DESC LIMIT $4",
            tenant, prefix.replace("%", r"\%").replace("_", r"\_"), key_part(after, 0), limit,
        )
        return [_audit(r) for r in rows]

    async def claim_request(self, tenant: str, key: str, resource: str) -> str | None:
        """None when this call claimed the request id; else the resource an earlier call with
        it made. Two calls with the same id at once: the second waits for the first to commit
        (ON CONFLICT), then reads what it claimed, instead of failing on the unique key."""
        claimed = await self._db.fetchval(
            "INSERT INTO registry.requests (tenant, request_id, resource) VALUES ($1, $2, $3) "
            "ON CONFLICT (tenant, request_id) DO NOTHING RETURNING request_id",
            tenant, key, resource,
        )
        if claimed is not None:
            return None
        existing = await self._db.fetchval(
            "SELECT resource FROM registry.requests WHERE tenant = $1 AND request_id = $2",
            tenant, key,
        )
        return str(existing) if existing is not None else None
