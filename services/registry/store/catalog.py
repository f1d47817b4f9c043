"""SQL for agents, their versions and the bundles behind them."""

from __future__ import annotations

from collections.abc import Collection

import asyncpg

from corral.manifest import Manifest
from corral.names import AgentRef, VersionRef
from services.common.execution import StartFailure
from services.common.paging import Key
from services.registry.model import AgentRecord, VersionRecord, VersionState
from services.registry.store.json_forms import (
    failure_from_json,
    failure_json,
    manifest_from_json,
    manifest_json,
)
from services.registry.store.rows import Rows, key_part

_AGENT_SELECT = """SELECT a.tenant, a.id, a.create_time,
    (SELECT max(number) FROM registry.versions v WHERE v.tenant = a.tenant AND v.agent = a.id)
        AS latest
    FROM registry.agents a"""


def _agent(row: asyncpg.Record) -> AgentRecord:
    return AgentRecord(row["tenant"], row["id"], row["create_time"], row["latest"] or 0)


def version_from_row(row: asyncpg.Record) -> VersionRecord:
    return VersionRecord(
        row["tenant"], row["agent"], row["number"], row["digest"], row["size"], manifest_from_json(row["manifest"]),
        row["create_time"], row["creator"], VersionState(row["state"]),
        failure_from_json(row["failure"]),
    )


class CatalogRows(Rows):
    async def get_agent(self, tenant: str, agent: AgentRef) -> AgentRecord | None:
        row = await self._db.fetchrow(
            _AGENT_SELECT + " WHERE a.tenant = $1 AND a.id = $2", tenant, agent.agent
        )
        return _agent(row) if row else None

    async def list_agents(self, tenant: str, after: Key | None, limit: int) -> list[AgentRecord]:
        rows = await self._db.fetch(
            _AGENT_SELECT + " WHERE a.tenant = $1 AND ($2::text IS NULL OR a.id > $2) "
            "ORDER BY a.id LIMIT $3",
            tenant, key_part(after, 0), limit,
        )
        return [_agent(r) for r in rows]

    async def ensure_agent(self, tenant: str, agent: AgentRef, creator: str) -> bool:
        created = await self._db.fetchval(
            "INSERT INTO registry.agents (tenant, id, creator) VALUES ($1, $2, $3) "
            "ON CONFLICT (tenant, id) DO NOTHING RETURNING true",
            tenant, agent.agent, creator,
        )
        await self.lock_agent(tenant, agent)
        return bool(created)

    async def lock_agent(self, tenant: str, agent: AgentRef) -> bool:
        return bool(await self._db.fetchval(
            "SELECT true FROM registry.agents WHERE tenant = $1 AND id = $2 FOR UPDATE",
            tenant, agent.agent,
        ))

    async def get_version(self, tenant: str, version: VersionRef) -> VersionRecord | None:
        by, value = ("number", version.number) if version.number else ("digest", version.digest)
        row = await self._db.fetchrow(
            f"SELECT * FROM registry.versions WHERE tenant = $1 AND agent = $2 AND {by} = $3",
            tenant, version.agent, value,
        )
        return version_from_row(row) if row else None

    async def version_with_digest(self, version: VersionRef) -> VersionRecord | None:
        row = await self._db.fetchrow(
            "SELECT * FROM registry.versions WHERE agent = $1 AND digest = $2 LIMIT 1",
            version.agent, version.digest,
        )
        return version_from_row(row) if row else None

    async def insert_version(
        self, tenant: str, agent: AgentRef, digest: str, data: bytes, manifest: Manifest,
        creator: str, state: VersionState,
    ) -> VersionRecord:
        # DO UPDATE (not DO NOTHING) locks a bundle already stored until this transaction ends,
        # so collecting unused bundles (store/lifecycle.py) cannot delete it under this version.
        await self._db.execute(
            "INSERT INTO registry.bundles (digest, size, data) VALUES ($1, $2, $3) "
            "ON CONFLICT (digest) DO UPDATE SET size = EXCLUDED.size",
            digest, len(data), data,
        )
        # Numbers of deleted versions are never given again (registry.version_numbers).
        row = await self._db.fetchrow(
            """INSERT INTO registry.versions
                   (tenant, agent, number, digest, size, manifest, creator, state)
               VALUES ($1, $2, greatest(
                           (SELECT coalesce(max(number), 0) FROM registry.versions
                            WHERE tenant = $1 AND agent = $2),
                           (SELECT coalesce(max(highest), 0) FROM registry.version_numbers
                            WHERE tenant = $1 AND agent = $2)) + 1,
                       $3, $4, $5, $6, $7)
               RETURNING *""",
            tenant, agent.agent, digest, len(data), manifest_json(manifest), creator, state.value,
        )
        assert row is not None  # RETURNING of an INSERT without ON CONFLICT
        return version_from_row(row)

    async def settle_version(
        self, tenant: str, version: VersionRef, state: VersionState, failure: StartFailure | None,
    ) -> VersionRecord:
        row = await self._db.fetchrow(
            "UPDATE registry.versions SET state = $4, failure = $5 "
            "WHERE tenant = $1 AND agent = $2 AND number = $3 RETURNING *",
            tenant, version.agent, version.number, state.value, failure_json(failure),
        )
        assert row is not None, f"{version} was settled before it was stored"
        return version_from_row(row)

    async def version_states(
        self, tenant: str, agent: AgentRef, numbers: Collection[int]
    ) -> dict[int, VersionState]:
        rows = await self._db.fetch(
            "SELECT number, state FROM registry.versions WHERE tenant = $1 AND agent = $2 "
            "AND number = ANY($3::bigint[])",
            tenant, agent.agent, list(numbers),
        )
        return {r["number"]: VersionState(r["state"]) for r in rows}

    async def list_versions(
        self, tenant: str, agent: AgentRef, after: Key | None, limit: int
    ) -> list[VersionRecord]:
        rows = await self._db.fetch(
            "SELECT * FROM registry.versions WHERE tenant = $1 AND agent = $2 "
            "AND ($3::bigint IS NULL OR number > $3) ORDER BY number LIMIT $4",
            tenant, agent.agent, key_part(after, 0), limit,
        )
        return [version_from_row(r) for r in rows]

    async def bundle(self, digest: str) -> bytes | None:
        data = await self._db.fetchval("SELECT data FROM registry.bundles WHERE digest = $1", digest)
        return bytes(data) if data is not None else None
