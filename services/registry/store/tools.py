"""SQL for tools, per tenant."""

from __future__ import annotations

import asyncpg

from corral.names import ToolRef
from services.common.paging import Key
from services.registry.store.lifecycle import DELETIONS_CHANNEL
from services.registry.store.rows import Rows, key_part
from services.registry.tool_model import ToolRecord, ToolSpec


def _tool(row: asyncpg.Record) -> ToolRecord:
    return ToolRecord(
        tenant=row["tenant"],
        id=row["name"],
        spec=ToolSpec(row["kind"], row["address"], row["timeout_ms"], row["description"]),
        secret_ciphertext=row["secret_ciphertext"],
        revision=row["revision"],
        create_time=row["create_time"],
        update_time=row["update_time"],
    )


class ToolRows(Rows):
    async def get_tool(
        self, tenant: str, tool: ToolRef, *, for_update: bool = False
    ) -> ToolRecord | None:
        lock = " FOR UPDATE" if for_update else ""
        row = await self._db.fetchrow(
            "SELECT * FROM registry.tools WHERE tenant = $1 AND name = $2" + lock, tenant, tool.tool
        )
        return _tool(row) if row else None

    async def list_tools(self, tenant: str, after: Key | None, limit: int) -> list[ToolRecord]:
        rows = await self._db.fetch(
            "SELECT * FROM registry.tools WHERE tenant = $1 AND ($2::text IS NULL OR name > $2) "
            "ORDER BY name LIMIT $3",
            tenant, key_part(after, 0), limit,
        )
        return [_tool(r) for r in rows]

    async def insert_tool(
        self, tenant: str, tool: ToolRef, spec: ToolSpec, ciphertext: bytes | None, creator: str
    ) -> ToolRecord | None:
        row = await self._db.fetchrow(
            """INSERT INTO registry.tools
                   (tenant, name, kind, address, timeout_ms, description, secret_ciphertext, creator)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               ON CONFLICT (tenant, name) DO NOTHING
               RETURNING *""",
            tenant, tool.tool, spec.kind, spec.address, spec.timeout_ms, spec.description,
            ciphertext, creator,
        )
        return _tool(row) if row else None

    async def update_tool(
        self, tenant: str, tool: ToolRef, spec: ToolSpec, ciphertext: bytes | None
    ) -> ToolRecord:
        row = await self._db.fetchrow(
            """UPDATE registry.tools SET kind = $3, address = $4, timeout_ms = $5,
                   description = $6, secret_ciphertext = $7, revision = revision + 1,
                   update_time = now()
               WHERE tenant = $1 AND name = $2
               RETURNING *""",
            tenant, tool.tool, spec.kind, spec.address, spec.timeout_ms, spec.description,
            ciphertext,
        )
        assert row is not None  # the caller holds the row's lock
        await self._tool_changed(tenant, tool)
        return _tool(row)

    async def delete_tool(self, tenant: str, tool: ToolRef) -> None:
        await self._db.execute(
            "DELETE FROM registry.tools WHERE tenant = $1 AND name = $2", tenant, tool.tool
        )
        await self._tool_changed(tenant, tool)

    async def _tool_changed(self, tenant: str, tool: ToolRef) -> None:
        """Tells the endpoint watch's listeners, once this transaction commits, that executors'
        cached copies of the tool are stale."""
        await self._db.execute(
            "SELECT pg_notify($1, $2)", DELETIONS_CHANNEL, f"tool/{tenant}/{tool.tool}"
        )
