"""SQL for endpoints: their traffic, the versions each served alone (what a rollback returns
to), and the notification that tells every replica's watchers about a change."""

from __future__ import annotations

import secrets

import asyncpg

from corral.names import AgentRef, EndpointRef
from services.common.endpoints import TrafficShare
from services.common.paging import Key
from services.registry.model import EndpointRecord
from services.registry.store.json_forms import traffic_from_json, traffic_json
from services.registry.store.rows import Rows, key_part

ENDPOINTS_CHANNEL = "corral_endpoints"


def _endpoint(row: asyncpg.Record) -> EndpointRecord:
    return EndpointRecord(
        tenant=row["tenant"], agent=row["agent"], id=row["id"], follow_latest=row["follow_latest"], salt=row["salt"],
        revision=row["revision"], description=row["description"],
        traffic=traffic_from_json(row["traffic"]), create_time=row["create_time"],
        update_time=row["update_time"], rollback_version=row["rollback_version"],
    )


def change_payload(record: EndpointRecord) -> str:
    """What the notification of a change says: tenant/agent/endpoint/revision (none of the
    names can hold a slash)."""
    return f"{record.tenant}/{record.agent}/{record.id}/{record.revision}"


class EndpointRows(Rows):
    async def get_endpoint(
        self, tenant: str, endpoint: EndpointRef, *, for_update: bool = False
    ) -> EndpointRecord | None:
        lock = " FOR UPDATE" if for_update else ""
        row = await self._db.fetchrow(
            "SELECT * FROM registry.endpoints WHERE tenant = $1 AND agent = $2 AND id = $3" + lock,
            tenant, endpoint.agent, endpoint.endpoint,
        )
        return _endpoint(row) if row else None

    async def list_endpoints(
        self, tenant: str, agent: AgentRef | None, after: Key | None, limit: int
    ) -> list[EndpointRecord]:
        rows = await self._db.fetch(
            "SELECT * FROM registry.endpoints WHERE tenant = $1 AND ($2::text IS NULL OR agent = $2) "
            "AND ($3::text IS NULL OR (agent, id) > ($3::text, $4::text)) ORDER BY agent, id LIMIT $5",
            tenant, agent.agent if agent else None, key_part(after, 0), key_part(after, 1), limit,
        )
        return [_endpoint(r) for r in rows]

    async def watched_endpoints(
        self, tenant: str | None, agent: AgentRef | None
    ) -> list[EndpointRecord]:
        rows = await self._db.fetch(
            "SELECT * FROM registry.endpoints WHERE ($1::text IS NULL OR tenant = $1) "
            "AND ($2::text IS NULL OR agent = $2) ORDER BY tenant, agent, id",
            tenant, agent.agent if agent else None,
        )
        return [_endpoint(r) for r in rows]

    async def webhook_url(self, tenant: str, endpoint: EndpointRef) -> str:
        url = await self._db.fetchval(
            "SELECT webhook_url FROM registry.endpoints WHERE tenant = $1 AND agent = $2 AND id = $3",
            tenant, endpoint.agent, endpoint.endpoint,
        )
        return str(url or "")

    async def last_stable(self, tenant: str, endpoint: EndpointRef, not_version: int) -> int | None:
        version = await self._db.fetchval(
            "SELECT version FROM registry.stable_history WHERE tenant = $1 AND agent = $2 "
            "AND endpoint = $3 AND version <> $4 ORDER BY seq DESC LIMIT 1",
            tenant, endpoint.agent, endpoint.endpoint, not_version,
        )
        return int(version) if version is not None else None

    async def put_endpoint(
        self, tenant: str, endpoint: EndpointRef, traffic: tuple[TrafficShare, ...], *,
        follow_latest: bool = False, description: str = "",
    ) -> EndpointRecord:
        agent, name = endpoint.agent, endpoint.endpoint
        # The versions it routed to until now were in use until now (what retention goes by).
        await self._db.execute(
            """UPDATE registry.versions v SET last_routed_time = now()
               FROM registry.endpoints e
               WHERE e.tenant = $1 AND e.agent = $2 AND e.id = $3
                 AND v.tenant = e.tenant AND v.agent = e.agent
                 AND v.number IN (SELECT (jsonb_array_elements(e.traffic) ->> 0)::bigint)""",
            tenant, agent, name,
        )
        if len(traffic) == 1:
            # The endpoint now serves one version alone: remember it as a stable version.
            await self._db.execute(
                """INSERT INTO registry.stable_history (tenant, agent, endpoint, version)
                   SELECT $1, $2, $3, $4 WHERE $4 IS DISTINCT FROM (
                       SELECT version FROM registry.stable_history
                       WHERE tenant = $1 AND agent = $2 AND endpoint = $3
                       ORDER BY seq DESC LIMIT 1)""",
                tenant, agent, name, traffic[0].version,
            )
        rollback = await self._db.fetchval(
            """SELECT version FROM registry.stable_history
               WHERE tenant = $1 AND agent = $2 AND endpoint = $3
                 AND NOT (version = ANY($4::bigint[]))
               ORDER BY seq DESC LIMIT 1""",
            tenant, agent, name, [s.version for s in traffic],
        )
        row = await self._db.fetchrow(
            """INSERT INTO registry.endpoints
                   (tenant, agent, id, traffic, follow_latest, salt, description, rollback_version)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               ON CONFLICT (tenant, agent, id) DO UPDATE SET traffic = EXCLUDED.traffic,
                   description = EXCLUDED.description, rollback_version = EXCLUDED.rollback_version,
                   revision = registry.endpoints.revision + 1, update_time = now()
               RETURNING *""",
            tenant, agent, name, traffic_json(traffic), follow_latest, secrets.token_hex(8),
            description, rollback,
        )
        assert row is not None  # an upsert always returns its row
        record = _endpoint(row)
        await self._db.execute(
            "SELECT pg_notify($1, $2)", ENDPOINTS_CHANNEL, change_payload(record)
        )
        return record
