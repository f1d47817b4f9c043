"""SQL for rollouts, experiments and the endpoint's stable-version history."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg

from services.common.errors import FailedPrecondition

ACTIVE_STATES = ("PROGRESSING", "PAUSED", "RUNNING", "COMPLETE")


@dataclass(frozen=True)
class RolloutRecord:
    agent: str
    endpoint: str
    id: int
    kind: str
    stable_version: int
    candidate_version: int
    spec: Mapping[str, Any]
    state: str
    state_reason: str
    current_step: int
    current_weight: float
    last_analysis: Mapping[str, Any] | None
    last_check_time: datetime | None
    create_time: datetime
    update_time: datetime
    step_start_time: datetime
    traffic_start_time: datetime | None
    end_time: datetime | None
    creator: str
    revision: int

    @property
    def name(self) -> str:
        plural = "rollouts" if self.kind == "rollout" else "experiments"
        return f"agents/{self.agent}/endpoints/{self.endpoint}/{plural}/{self.id}"

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def etag(self) -> str:
        return f'W/"{self.revision}"'


def _record(row: asyncpg.Record) -> RolloutRecord:
    analysis = row["last_analysis"]
    return RolloutRecord(
        agent=row["agent"], endpoint=row["endpoint"], id=row["id"], kind=row["kind"],
        stable_version=row["stable_version"], candidate_version=row["candidate_version"],
        spec=json.loads(row["spec"]), state=row["state"], state_reason=row["state_reason"],
        current_step=row["current_step"], current_weight=row["current_weight"],
        last_analysis=json.loads(analysis) if analysis else None, last_check_time=row["last_check_time"],
        create_time=row["create_time"], update_time=row["update_time"],
        step_start_time=row["step_start_time"], traffic_start_time=row["traffic_start_time"],
        end_time=row["end_time"], creator=row["creator"], revision=row["revision"],
    )


_UPDATABLE = {
    "state", "state_reason", "current_step", "current_weight", "last_analysis", "last_check_time",
    "step_start_time", "traffic_start_time", "end_time", "spec",
}


class RolloutStore:
    """Every method takes the connection of the caller's transaction, so a rollout's progress and
    its effect on the endpoint commit together."""

    async def insert(
        self, conn: asyncpg.Connection, agent: str, endpoint: str, kind: str, stable: int,
        candidate: int, spec: Mapping[str, Any], state: str, creator: str,
    ) -> RolloutRecord:
        running = await self.active_for_endpoint(conn, agent, endpoint)
        if running is not None:
            raise FailedPrecondition(
                f"{running.name} is still {running.state.lower()} on agents/{agent}/endpoints/{endpoint}; "
                "promote, abort or conclude it first",
                reason="ROLLOUT_RUNNING", metadata={"running": running.name},
            )
        try:
            row = await conn.fetchrow(
                """INSERT INTO registry.rollouts
                       (agent, endpoint, id, kind, stable_version, candidate_version, spec, state, creator)
                   VALUES ($1, $2, (SELECT coalesce(max(id), 0) + 1 FROM registry.rollouts
                                    WHERE agent = $1 AND endpoint = $2 AND kind = $3),
                           $3, $4, $5, $6, $7, $8)
                   RETURNING *""",
                agent, endpoint, kind, stable, candidate, json.dumps(spec), state, creator,
            )
        except asyncpg.UniqueViolationError:
            raise FailedPrecondition(
                f"another rollout or experiment started on agents/{agent}/endpoints/{endpoint} just now",
                reason="ROLLOUT_RUNNING",
            ) from None
        return _record(row)

    async def get(
        self, conn: asyncpg.Connection | asyncpg.Pool, agent: str, endpoint: str, kind: str, id: int | None,
        *, for_update: bool = False,
    ) -> RolloutRecord | None:
        lock = " FOR UPDATE" if for_update else ""
        if id is None:
            row = await conn.fetchrow(
                "SELECT * FROM registry.rollouts WHERE agent = $1 AND endpoint = $2 AND kind = $3 "
                "ORDER BY id DESC LIMIT 1" + lock, agent, endpoint, kind,
            )
        else:
            row = await conn.fetchrow(
                "SELECT * FROM registry.rollouts WHERE agent = $1 AND endpoint = $2 AND kind = $3 AND id = $4"
                + lock, agent, endpoint, kind, id,
            )
        return _record(row) if row else None

    async def list(
        self, pool: asyncpg.Pool, agent: str, endpoint: str, kind: str, offset: int, limit: int
    ) -> list[RolloutRecord]:
        rows = await pool.fetch(
            "SELECT * FROM registry.rollouts WHERE agent = $1 AND endpoint = $2 AND kind = $3 "
            "ORDER BY id DESC OFFSET $4 LIMIT $5", agent, endpoint, kind, offset, limit,
        )
        return [_record(r) for r in rows]

    async def active(self, pool: asyncpg.Pool) -> list[RolloutRecord]:
        rows = await pool.fetch(
            "SELECT * FROM registry.rollouts WHERE state = ANY($1::text[]) ORDER BY create_time",
            list(ACTIVE_STATES),
        )
        return [_record(r) for r in rows]

    async def recent(self, pool: asyncpg.Pool, limit: int = 200) -> list[RolloutRecord]:
        """Running rollouts and experiments, and the latest ended one of each endpoint."""
        rows = await pool.fetch(
            """SELECT DISTINCT ON (agent, endpoint, kind) * FROM registry.rollouts
               ORDER BY agent, endpoint, kind, id DESC LIMIT $1""", limit,
        )
        return [_record(r) for r in rows]

    async def due_drains(self, pool: asyncpg.Pool) -> list[RolloutRecord]:
        """Rolled-back or aborted rollouts whose drained candidate sessions are due to be stopped."""
        rows = await pool.fetch(
            """SELECT * FROM registry.rollouts
               WHERE kind = 'rollout' AND state IN ('ROLLED_BACK', 'ABORTED')
                 AND spec->>'rollback_policy' = 'DRAIN' AND NOT coalesce((spec->>'drained')::boolean, false)
                 AND end_time + make_interval(secs => (spec->>'drain_timeout_s')::double precision) < now()""",
        )
        return [_record(r) for r in rows]

    async def active_for_endpoint(
        self, conn: asyncpg.Connection, agent: str, endpoint: str
    ) -> RolloutRecord | None:
        row = await conn.fetchrow(
            "SELECT * FROM registry.rollouts WHERE agent = $1 AND endpoint = $2 AND state = ANY($3::text[]) "
            "FOR UPDATE", agent, endpoint, list(ACTIVE_STATES),
        )
        return _record(row) if row else None

    async def update(self, conn: asyncpg.Connection, record: RolloutRecord, **changes: Any) -> RolloutRecord:
        """Writes `changes` if the row is still at the record's revision (a driver that lost its
        lock cannot apply a step twice)."""
        unknown = set(changes) - _UPDATABLE
        assert not unknown, unknown
        sets, args = [], []
        for i, (key, value) in enumerate(changes.items(), start=5):
            if key in ("last_analysis", "spec") and value is not None:
                value = json.dumps(value)
            sets.append(f"{key} = ${i}")
            args.append(value)
        row = await conn.fetchrow(
            f"""UPDATE registry.rollouts SET {', '.join(sets)}, update_time = now(), revision = revision + 1
                WHERE agent = $1 AND endpoint = $2 AND kind = $3 AND id = $4 AND revision = {record.revision}
                RETURNING *""",
            record.agent, record.endpoint, record.kind, record.id, *args,
        )
        if row is None:
            raise FailedPrecondition(f"{record.name} changed while it was being updated; retry",
                                     reason="ROLLOUT_CHANGED")
        return replace(_record(row))

    async def try_lock(self, conn: asyncpg.Connection, record: RolloutRecord) -> bool:
        """A transaction-scoped advisory lock: exactly one registry replica drives a rollout."""
        return bool(await conn.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtext('corral.rollout'), hashtext($1))", record.name
        ))

    async def last_stable(self, conn: asyncpg.Connection, agent: str, endpoint: str, not_version: int) -> int | None:
        return await conn.fetchval(  # type: ignore[no-any-return]
            "SELECT version FROM registry.stable_history WHERE agent = $1 AND endpoint = $2 AND version <> $3 "
            "ORDER BY seq DESC LIMIT 1", agent, endpoint, not_version,
        )
