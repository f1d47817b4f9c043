"""SQL for agents, their versions and the bundles behind them."""

from __future__ import annotations

from collections.abc import Collection

import asyncpg

from corral.manifest import Manifest
from corral.names import AgentRef, VersionRef
from services.common.paging import Key
from services.registry.model import AgentRecord, VersionRecord
from services.registry.store.json_forms import manifest_from_json, manifest_json
from services.registry.store.rows import Rows, key_part

_AGENT_SELECT = """SELECT a.id, a.create_time,
    (SELECT max(number) FROM registry.versions v WHERE v.agent = a.id) AS latest
    FROM registry.agents a"""


def _agent(row: asyncpg.Record) -> AgentRecord:
    return AgentRecord(row["id"], row["create_time"], row["latest"] or 0)


def _version(row: asyncpg.Record) -> VersionRecord:
    return VersionRecord(
        row["agent"], row["number"], row["digest"], row["size"], manifest_from_json(row["manifest"]),
        row["create_time"], row["creator"],
    )


class CatalogRows(Rows):
    async def get_agent(self, agent: AgentRef) -> AgentRecord | None:
        row = await self._db.fetchrow(_AGENT_SELECT + " WHERE a.id = $1", agent.agent)
        return _agent(row) if row else None

    async def list_agents(self, after: Key | None, limit: int) -> list[AgentRecord]:
        rows = await self._db.fetch(
            _AGENT_SELECT + " WHERE ($1::text IS NULL OR a.id > $1) ORDER BY a.id LIMIT $2",
            key_part(after, 0), limit,
        )
        return [_agent(r) for r in rows]

    async def ensure_agent(self, agent: AgentRef, creator: str) -> bool:
        created = await self._db.fetchval(
            "INSERT INTO registry.agents (id, creator) VALUES ($1, $2) "
            "ON CONFLICT (id) DO NOTHING RETURNING true",
            agent.agent, creator,
        )
        await self._db.execute("SELECT 1 FROM registry.agents WHERE id = $1 FOR UPDATE", agent.agent)
        return bool(created)

    async def lock_agent(self, agent: AgentRef) -> bool:
        return bool(await self._db.fetchval(
            "SELECT true FROM registry.agents WHERE id = $1 FOR UPDATE", agent.agent
        ))

    async def get_version(self, version: VersionRef) -> VersionRecord | None:
        if version.number:
            row = await self._db.fetchrow(
                "SELECT * FROM registry.versions WHERE agent = $1 AND number = $2",
                version.agent, version.number,
            )
        else:
            row = await self._db.fetchrow(
                "SELECT * FROM registry.versions WHERE agent = $1 AND digest = $2",
                version.agent, version.digest,
            )
        return _version(row) if row else None

    async def insert_version(
        self, agent: AgentRef, digest: str, data: bytes, manifest: Manifest, creator: str
    ) -> VersionRecord:
        await self._db.execute(
            "INSERT INTO registry.bundles (digest, size, data) VALUES ($1, $2, $3) "
            "ON CONFLICT (digest) DO NOTHING",
            digest, len(data), data,
        )
        row = await self._db.fetchrow(
            """INSERT INTO registry.versions (agent, number, digest, size, manifest, creator)
               VALUES ($1, (SELECT coalesce(max(number), 0) + 1 FROM registry.versions WHERE agent = $1),
                       $2, $3, $4, $5)
               RETURNING *""",
            agent.agent, digest, len(data), manifest_json(manifest), creator,
        )
        assert row is not None  # RETURNING of an INSERT without ON CONFLICT
        return _version(row)

    async def existing_versions(self, agent: AgentRef, numbers: Collection[int]) -> set[int]:
        rows = await self._db.fetch(
            "SELECT number FROM registry.versions WHERE agent = $1 AND number = ANY($2::bigint[])",
            agent.agent, list(numbers),
        )
        return {r["number"] for r in rows}

    async def list_versions(
        self, agent: AgentRef, after: Key | None, limit: int
    ) -> list[VersionRecord]:
        rows = await self._db.fetch(
            "SELECT * FROM registry.versions WHERE agent = $1 AND ($2::bigint IS NULL OR number > $2) "
            "ORDER BY number LIMIT $3",
            agent.agent, key_part(after, 0), limit,
        )
        return [_version(r) for r in rows]

    async def bundle(self, digest: str) -> bytes | None:
        data = await self._db.fetchval("SELECT data FROM registry.bundles WHERE digest = $1", digest)
        return bytes(data) if data is not None else None
