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
            who.tenant, who.user, method, resource, dumps(details),
        )

    async def list_audit(self, prefix: str, after: Key | None, limit: int) -> list[AuditRecord]:
        rows = await self._db.fetch(
            "SELECT * FROM registry.audit_events WHERE resource LIKE $1 || '%' "
            "AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
            prefix.replace("%", r"\%").replace("_", r"\_"), key_part(after, 0), limit,
        )
        return [_audit(r) for r in rows]

    async def claim_request(self, key: str, resource: str) -> str | None:
        existing = await self._db.fetchval(
            "SELECT resource FROM registry.requests WHERE request_id = $1", key
        )
        if existing is None:
            await self._db.execute(
                "INSERT INTO registry.requests (request_id, resource) VALUES ($1, $2)", key, resource
            )
            return None
        return str(existing)
