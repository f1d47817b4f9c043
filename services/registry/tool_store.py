"""The registry's storage for tools: the only module that speaks SQL for registry.tools."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg


@dataclass(frozen=True)
class ToolSpec:
    """What a tool is, as written: everything but its secret, times and revision."""

    kind: str  # "http" or "grpc"
    address: str
    timeout_ms: int
    description: str


@dataclass(frozen=True)
class ToolRecord:
    tenant: str
    id: str
    spec: ToolSpec
    # Sealed by services.registry.secrets; never leaves the registry except decrypted to the
    # executor through ResolveTool.
    secret_ciphertext: bytes | None = field(repr=False)
    revision: int
    create_time: datetime
    update_time: datetime

    @property
    def etag(self) -> str:
        return f'W/"{self.revision}"'

    @property
    def has_secret(self) -> bool:
        return self.secret_ciphertext is not None


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


class ToolTx:
    """Writes inside one transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def get_for_update(self, tenant: str, tool: str) -> ToolRecord | None:
        row = await self.conn.fetchrow(
            "SELECT * FROM registry.tools WHERE tenant = $1 AND name = $2 FOR UPDATE", tenant, tool
        )
        return _tool(row) if row else None

    async def insert(
        self, tenant: str, tool: str, spec: ToolSpec, ciphertext: bytes | None, creator: str
    ) -> ToolRecord | None:
        """The new tool, or None when the tenant already has one by that name."""
        row = await self.conn.fetchrow(
            """INSERT INTO registry.tools
                   (tenant, name, kind, address, timeout_ms, description, secret_ciphertext, creator)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               ON CONFLICT (tenant, name) DO NOTHING
               RETURNING *""",
            tenant, tool, spec.kind, spec.address, spec.timeout_ms, spec.description, ciphertext,
            creator,
        )
        return _tool(row) if row else None

    async def update(
        self, tenant: str, tool: str, spec: ToolSpec, ciphertext: bytes | None
    ) -> ToolRecord:
        row = await self.conn.fetchrow(
            """UPDATE registry.tools SET kind = $3, address = $4, timeout_ms = $5,
                   description = $6, secret_ciphertext = $7, revision = revision + 1,
                   update_time = now()
               WHERE tenant = $1 AND name = $2
               RETURNING *""",
            tenant, tool, spec.kind, spec.address, spec.timeout_ms, spec.description, ciphertext,
        )
        return _tool(row)

    async def delete(self, tenant: str, tool: str) -> None:
        await self.conn.execute(
            "DELETE FROM registry.tools WHERE tenant = $1 AND name = $2", tenant, tool
        )

    async def claim_request(self, tenant: str, request_id: str, resource: str) -> str | None:
        """Records a create's request id; returns the resource an earlier request with the same
        id created. Keyed by tenant too, so tenants cannot collide or probe each other's ids."""
        key = f"{tenant}/{request_id}"
        existing = await self.conn.fetchval(
            "SELECT resource FROM registry.requests WHERE request_id = $1", key
        )
        if existing is None:
            await self.conn.execute(
                "INSERT INTO registry.requests (request_id, resource) VALUES ($1, $2)", key, resource
            )
        return existing  # type: ignore[no-any-return]

    async def audit(
        self, tenant: str, user: str, method: str, resource: str, details: Mapping[str, Any]
    ) -> None:
        await self.conn.execute(
            'INSERT INTO registry.audit_events (tenant, "user", method, resource, details) '
            "VALUES ($1, $2, $3, $4, $5)",
            tenant, user, method, resource, json.dumps(details, default=str),
        )


class ToolStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[ToolTx]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield ToolTx(conn)

    async def get(self, tenant: str, tool: str) -> ToolRecord | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM registry.tools WHERE tenant = $1 AND name = $2", tenant, tool
        )
        return _tool(row) if row else None

    async def list_tools(self, tenant: str, offset: int, limit: int) -> list[ToolRecord]:
        rows = await self.pool.fetch(
            "SELECT * FROM registry.tools WHERE tenant = $1 ORDER BY name OFFSET $2 LIMIT $3",
            tenant, offset, limit,
        )
        return [_tool(r) for r in rows]
