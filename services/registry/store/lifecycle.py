"""SQL for deleting agents, versions and endpoints, collecting the bundles no version has any
more, and finding the versions retention may delete."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from corral.names import AgentRef, EndpointRef
from services.registry.lifecycle_model import RetentionCandidate
from services.registry.rollout_model import ACTIVE_STATES, RunRecord
from services.registry.store.catalog import version_from_row
from services.registry.store.endpoints import ENDPOINTS_CHANNEL
from services.registry.store.rows import Rows
from services.registry.store.runs import run_from_row

# What was deleted (or, for tools, changed), for every replica's watchers:
# "version/<tenant>/<agent>/<number>", "bundle/<digest>" or "tool/<tenant>/<tool>" (none of the
# names can hold a slash).
DELETIONS_CHANNEL = "corral_deletions"


class LifecycleRows(Rows):
    async def agent_runs(self, tenant: str, agent: AgentRef) -> list[RunRecord]:
        rows = await self._db.fetch(
            "SELECT * FROM registry.rollouts WHERE tenant = $1 AND agent = $2 "
            "AND state = ANY($3::text[]) ORDER BY endpoint, kind, id",
            tenant, agent.agent, list(ACTIVE_STATES),
        )
        return [run_from_row(r) for r in rows]

    async def version_numbers(self, tenant: str, agent: AgentRef) -> list[int]:
        rows = await self._db.fetch(
            "SELECT number FROM registry.versions WHERE tenant = $1 AND agent = $2 ORDER BY number",
            tenant, agent.agent,
        )
        return [r["number"] for r in rows]

    async def delete_versions(
        self, tenant: str, agent: AgentRef, numbers: Collection[int]
    ) -> list[str]:
        # Keep the highest number the agent ever had, so that no number is given twice.
        await self._db.execute(
            """INSERT INTO registry.version_numbers (tenant, agent, highest)
               SELECT $1, $2, max(number) FROM registry.versions WHERE tenant = $1 AND agent = $2
               HAVING max(number) IS NOT NULL
               ON CONFLICT (tenant, agent) DO UPDATE
                   SET highest = greatest(registry.version_numbers.highest, EXCLUDED.highest)""",
            tenant, agent.agent,
        )
        # A deleted version is no rollback target any more.
        await self._db.execute(
            "DELETE FROM registry.stable_history WHERE tenant = $1 AND agent = $2 "
            "AND version = ANY($3::bigint[])",
            tenant, agent.agent, list(numbers),
        )
        rows = await self._db.fetch(
            "DELETE FROM registry.versions WHERE tenant = $1 AND agent = $2 "
            "AND number = ANY($3::bigint[]) RETURNING number, digest",
            tenant, agent.agent, list(numbers),
        )
        for row in rows:
            await self._db.execute("SELECT pg_notify($1, $2)", DELETIONS_CHANNEL,
                                   f"version/{tenant}/{agent.agent}/{row['number']}")
        return sorted({r["digest"] for r in rows})

    async def collect_bundles(self, digests: Collection[str]) -> list[str]:
        # Lock the bundles first, then look for versions in a statement of its own: a publish
        # of the same digest holds its bundle's row until it commits (insert_version), so either
        # its version is seen here and the bundle kept, or it waits and stores the bundle again.
        await self._db.execute(
            "SELECT 1 FROM registry.bundles WHERE digest = ANY($1::text[]) ORDER BY digest FOR UPDATE",
            list(digests),
        )
        rows = await self._db.fetch(
            """DELETE FROM registry.bundles b WHERE b.digest = ANY($1::text[])
                 AND NOT EXISTS (SELECT 1 FROM registry.versions v WHERE v.digest = b.digest)
               RETURNING b.digest""",
            list(digests),
        )
        removed = sorted(r["digest"] for r in rows)
        for digest in removed:
            await self._db.execute("SELECT pg_notify($1, $2)", DELETIONS_CHANNEL, f"bundle/{digest}")
        return removed

    async def delete_endpoint(self, tenant: str, endpoint: EndpointRef, revision: int) -> None:
        key = (tenant, endpoint.agent, endpoint.endpoint)
        for table in ("rollouts", "stable_history"):
            await self._db.execute(
                f"DELETE FROM registry.{table} WHERE tenant = $1 AND agent = $2 AND endpoint = $3",
                *key,
            )
        await self._db.execute(
            "DELETE FROM registry.endpoints WHERE tenant = $1 AND agent = $2 AND id = $3", *key
        )
        # Watchers read the endpoint again on a change and find it gone.
        await self._db.execute(
            "SELECT pg_notify($1, $2)", ENDPOINTS_CHANNEL, "/".join((*key, str(revision + 1)))
        )

    async def delete_agent(self, tenant: str, agent: AgentRef) -> None:
        await self._db.execute(
            "DELETE FROM registry.agents WHERE tenant = $1 AND id = $2", tenant, agent.agent
        )

    async def retention_candidates(self, unused_since: datetime) -> list[RetentionCandidate]:
        rows = await self._db.fetch(
            """SELECT v.*, greatest(v.create_time, v.last_routed_time) AS last_used
               FROM registry.versions v
               WHERE greatest(v.create_time, v.last_routed_time) < $1
                 AND v.number < (SELECT max(n.number) FROM registry.versions n
                                 WHERE n.tenant = v.tenant AND n.agent = v.agent)
               ORDER BY v.tenant, v.agent, v.number""",
            unused_since,
        )
        return [RetentionCandidate(version_from_row(r), r["last_used"]) for r in rows]
