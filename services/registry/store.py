"""The registry's storage: the only module that speaks SQL for agents, versions, endpoints, audit."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.registry.traffic import TrafficShare

ENDPOINTS_CHANNEL = "corral_endpoints"


@dataclass(frozen=True)
class AgentRecord:
    id: str
    create_time: datetime
    latest_version: int


@dataclass(frozen=True)
class VersionRecord:
    agent: str
    number: int
    digest: str
    size: int
    manifest: Mapping[str, Any]
    create_time: datetime
    creator: str


@dataclass(frozen=True)
class EndpointRecord:
    agent: str
    id: str
    traffic: tuple[TrafficShare, ...]
    follow_latest: bool
    salt: str
    revision: int
    description: str
    create_time: datetime
    update_time: datetime
    # The last version that served the endpoint alone and is not in its traffic now.
    rollback_version: int | None = None

    @property
    def etag(self) -> str:
        return f'W/"{self.revision}"'


@dataclass(frozen=True)
class AuditRecord:
    id: int
    time: datetime
    tenant: str
    user: str
    method: str
    resource: str
    details: Mapping[str, Any]


def _agent(row: asyncpg.Record) -> AgentRecord:
    return AgentRecord(row["id"], row["create_time"], row["latest"] or 0)


def _version(row: asyncpg.Record) -> VersionRecord:
    return VersionRecord(
        row["agent"], row["number"], row["digest"], row["size"], json.loads(row["manifest"]),
        row["create_time"], row["creator"],
    )


def _endpoint(row: asyncpg.Record) -> EndpointRecord:
    traffic = tuple(TrafficShare(int(v), int(bp)) for v, bp in json.loads(row["traffic"]))
    return EndpointRecord(
        row["agent"], row["id"], traffic, row["follow_latest"], row["salt"], row["revision"],
        row["description"], row["create_time"], row["update_time"], row["rollback_version"],
    )


def _audit(row: asyncpg.Record) -> AuditRecord:
    return AuditRecord(
        row["id"], row["time"], row["tenant"], row["user"], row["method"], row["resource"],
        json.loads(row["details"]),
    )


_AGENT_SELECT = """SELECT a.id, a.create_time,
    (SELECT max(number) FROM registry.versions v WHERE v.agent = a.id) AS latest
    FROM registry.agents a"""


class Tx:
    """Writes inside one transaction. Endpoint changes NOTIFY the watchers on commit."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def ensure_agent(self, agent: str, creator: str) -> bool:
        """Creates the agent if missing and locks its row; True if it was created."""
        created = await self.conn.fetchval(
            "INSERT INTO registry.agents (id, creator) VALUES ($1, $2) "
            "ON CONFLICT (id) DO NOTHING RETURNING true",
            agent, creator,
        )
        await self.conn.execute("SELECT 1 FROM registry.agents WHERE id = $1 FOR UPDATE", agent)
        return bool(created)

    async def lock_agent(self, agent: str) -> bool:
        return bool(
            await self.conn.fetchval("SELECT true FROM registry.agents WHERE id = $1 FOR UPDATE", agent)
        )

    async def version_by_digest(self, agent: str, digest: str) -> VersionRecord | None:
        row = await self.conn.fetchrow(
            "SELECT * FROM registry.versions WHERE agent = $1 AND digest = $2", agent, digest
        )
        return _version(row) if row else None

    async def insert_version(
        self, agent: str, digest: str, data: bytes, manifest: Mapping[str, Any], creator: str
    ) -> VersionRecord:
        await self.conn.execute(
            "INSERT INTO registry.bundles (digest, size, data) VALUES ($1, $2, $3) "
            "ON CONFLICT (digest) DO NOTHING",
            digest, len(data), data,
        )
        row = await self.conn.fetchrow(
            """INSERT INTO registry.versions (agent, number, digest, size, manifest, creator)
               VALUES ($1, (SELECT coalesce(max(number), 0) + 1 FROM registry.versions WHERE agent = $1),
                       $2, $3, $4, $5)
               RETURNING *""",
            agent, digest, len(data), json.dumps(manifest), creator,
        )
        return _version(row)

    async def existing_versions(self, agent: str, numbers: list[int]) -> set[int]:
        rows = await self.conn.fetch(
            "SELECT number FROM registry.versions WHERE agent = $1 AND number = ANY($2::bigint[])",
            agent, numbers,
        )
        return {r["number"] for r in rows}

    async def endpoint_for_update(self, agent: str, endpoint: str) -> EndpointRecord | None:
        row = await self.conn.fetchrow(
            "SELECT * FROM registry.endpoints WHERE agent = $1 AND id = $2 FOR UPDATE", agent, endpoint
        )
        return _endpoint(row) if row else None

    async def put_endpoint(
        self,
        agent: str,
        endpoint: str,
        traffic: tuple[TrafficShare, ...],
        *,
        follow_latest: bool = False,
        description: str = "",
    ) -> EndpointRecord:
        traffic_json = json.dumps([[s.version, s.basis_points] for s in traffic])
        if len(traffic) == 1:
            # The endpoint now serves one version alone: remember it as a stable version.
            await self.conn.execute(
                """INSERT INTO registry.stable_history (agent, endpoint, version)
                   SELECT $1, $2, $3 WHERE $3 IS DISTINCT FROM (
                       SELECT version FROM registry.stable_history WHERE agent = $1 AND endpoint = $2
                       ORDER BY seq DESC LIMIT 1)""",
                agent, endpoint, traffic[0].version,
            )
        rollback = await self.conn.fetchval(
            """SELECT version FROM registry.stable_history
               WHERE agent = $1 AND endpoint = $2 AND NOT (version = ANY($3::bigint[]))
               ORDER BY seq DESC LIMIT 1""",
            agent, endpoint, [s.version for s in traffic],
        )
        row = await self.conn.fetchrow(
            """INSERT INTO registry.endpoints
                   (agent, id, traffic, follow_latest, salt, description, rollback_version)
               VALUES ($1, $2, $3, $4, $5, $6, $7)
               ON CONFLICT (agent, id) DO UPDATE SET traffic = EXCLUDED.traffic,
                   description = EXCLUDED.description, rollback_version = EXCLUDED.rollback_version,
                   revision = registry.endpoints.revision + 1, update_time = now()
               RETURNING *""",
            agent, endpoint, traffic_json, follow_latest, secrets.token_hex(8), description, rollback,
        )
        record = _endpoint(row)
        await self.conn.execute(
            "SELECT pg_notify($1, $2)", ENDPOINTS_CHANNEL, f"{agent}/{endpoint}/{record.revision}"
        )
        return record

    async def audit(
        self, tenant: str, user: str, method: str, resource: str, details: Mapping[str, Any]
    ) -> None:
        await self.conn.execute(
            'INSERT INTO registry.audit_events (tenant, "user", method, resource, details) '
            "VALUES ($1, $2, $3, $4, $5)",
            tenant, user, method, resource, json.dumps(details, default=str),
        )

    async def claim_request(self, request_id: str, resource: str) -> str | None:
        """Records a request id; returns the resource of an earlier request with the same id."""
        existing = await self.conn.fetchval(
            "SELECT resource FROM registry.requests WHERE request_id = $1", request_id
        )
        if existing is None:
            await self.conn.execute(
                "INSERT INTO registry.requests (request_id, resource) VALUES ($1, $2)", request_id, resource
            )
        return existing  # type: ignore[no-any-return]


class RegistryStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    def tx(self) -> _TxContext:
        return _TxContext(self.pool)

    async def get_agent(self, agent: str) -> AgentRecord | None:
        row = await self.pool.fetchrow(_AGENT_SELECT + " WHERE a.id = $1", agent)
        return _agent(row) if row else None

    async def list_agents(self, offset: int, limit: int) -> list[AgentRecord]:
        rows = await self.pool.fetch(_AGENT_SELECT + " ORDER BY a.id OFFSET $1 LIMIT $2", offset, limit)
        return [_agent(r) for r in rows]

    async def get_version(self, agent: str, number: int) -> VersionRecord | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM registry.versions WHERE agent = $1 AND number = $2", agent, number
        )
        return _version(row) if row else None

    async def get_version_by_digest(self, agent: str, digest: str) -> VersionRecord | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM registry.versions WHERE agent = $1 AND digest = $2", agent, digest
        )
        return _version(row) if row else None

    async def list_versions(self, agent: str, offset: int, limit: int) -> list[VersionRecord]:
        rows = await self.pool.fetch(
            "SELECT * FROM registry.versions WHERE agent = $1 ORDER BY number OFFSET $2 LIMIT $3",
            agent, offset, limit,
        )
        return [_version(r) for r in rows]

    async def bundle(self, digest: str) -> bytes | None:
        return await self.pool.fetchval(  # type: ignore[no-any-return]
            "SELECT data FROM registry.bundles WHERE digest = $1", digest
        )

    async def get_endpoint(self, agent: str, endpoint: str) -> EndpointRecord | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM registry.endpoints WHERE agent = $1 AND id = $2", agent, endpoint
        )
        return _endpoint(row) if row else None

    async def list_endpoints(self, agent: str | None, offset: int, limit: int) -> list[EndpointRecord]:
        rows = await self.pool.fetch(
            "SELECT * FROM registry.endpoints WHERE ($1::text IS NULL OR agent = $1) "
            "ORDER BY agent, id OFFSET $2 LIMIT $3",
            agent, offset, limit,
        )
        return [_endpoint(r) for r in rows]

    async def webhook_url(self, agent: str, endpoint: str) -> str:
        return await self.pool.fetchval(  # type: ignore[no-any-return]
            "SELECT webhook_url FROM registry.endpoints WHERE agent = $1 AND id = $2", agent, endpoint
        ) or ""

    async def list_audit(self, prefix: str, offset: int, limit: int) -> list[AuditRecord]:
        rows = await self.pool.fetch(
            "SELECT * FROM registry.audit_events WHERE resource LIKE $1 || '%' "
            "ORDER BY id DESC OFFSET $2 LIMIT $3",
            prefix.replace("%", r"\%").replace("_", r"\_"), offset, limit,
        )
        return [_audit(r) for r in rows]

    async def listen_endpoints(self, callback: Callable[[str], None]) -> Callable[[], Any]:
        """Calls `callback("agent/endpoint/revision")` on every committed endpoint change.
        Returns an async function that stops listening."""
        conn: asyncpg.Connection = await self.pool.acquire()

        def on_notify(_c: Any, _pid: int, _channel: str, payload: str) -> None:
            callback(payload)

        await conn.add_listener(ENDPOINTS_CHANNEL, on_notify)

        async def close() -> None:
            try:
                await conn.remove_listener(ENDPOINTS_CHANNEL, on_notify)
            finally:
                await self.pool.release(conn)

        return close


class _TxContext:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._conn: asyncpg.Connection | None = None
        self._tx: Any = None

    async def __aenter__(self) -> Tx:
        self._conn = await self.pool.acquire()
        self._tx = self._conn.transaction()
        await self._tx.start()
        return Tx(self._conn)

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self._conn is not None
        try:
            if exc_type is None:
                await self._tx.commit()
            else:
                await self._tx.rollback()
        finally:
            await self.pool.release(self._conn)
