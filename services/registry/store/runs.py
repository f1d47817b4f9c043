"""SQL for rollouts and experiments ("runs", one table: each changes one endpoint over time)."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from corral.names import EndpointRef, ExperimentRef, RolloutRef
from services.common.paging import Key
from services.registry.rollout_model import (
    ACTIVE_STATES,
    ExperimentRecord,
    ExperimentSpec,
    ExperimentState,
    RolloutRecord,
    RolloutSpec,
    RolloutState,
    RunRecord,
)
from services.registry.store.json_forms import (
    analysis_from_json,
    dumps,
    experiment_spec_from_json,
    experiment_spec_json,
    rollout_spec_from_json,
    rollout_spec_json,
)
from services.registry.store.rows import Rows, key_part

_ROLLOUT = "rollout"
_EXPERIMENT = "experiment"


def _rollout(row: asyncpg.Record) -> RolloutRecord:
    analysis = row["last_analysis"]
    return RolloutRecord(
        tenant=row["tenant"], endpoint=EndpointRef(row["agent"], row["endpoint"]), id=row["id"],
        stable_version=row["stable_version"], candidate_version=row["candidate_version"],
        spec=rollout_spec_from_json(row["spec"]), state=RolloutState(row["state"]),
        state_reason=row["state_reason"], current_step=row["current_step"],
        current_weight=row["current_weight"],
        last_analysis=analysis_from_json(analysis) if analysis else None,
        last_check_time=row["last_check_time"], step_start_time=row["step_start_time"],
        traffic_start_time=row["traffic_start_time"], end_time=row["end_time"],
        create_time=row["create_time"], update_time=row["update_time"], creator=row["creator"],
        revision=row["revision"],
    )


# Releases before the experiment states were their own wrote ROLLED_BACK into an experiment that
# an endpoint rollback ended; such an experiment was aborted.
_LEGACY_EXPERIMENT_STATES = {"ROLLED_BACK": ExperimentState.ABORTED}


def _experiment_state(stored: str) -> ExperimentState:
    return _LEGACY_EXPERIMENT_STATES.get(stored) or ExperimentState(stored)


def _experiment(row: asyncpg.Record) -> ExperimentRecord:
    return ExperimentRecord(
        tenant=row["tenant"], endpoint=EndpointRef(row["agent"], row["endpoint"]), id=row["id"],
        spec=experiment_spec_from_json(row["spec"]), state=_experiment_state(row["state"]),
        state_reason=row["state_reason"], traffic_start_time=row["traffic_start_time"],
        end_time=row["end_time"], create_time=row["create_time"], update_time=row["update_time"],
        creator=row["creator"], revision=row["revision"],
    )


def run_from_row(row: asyncpg.Record) -> RunRecord:
    return _rollout(row) if row["kind"] == _ROLLOUT else _experiment(row)


class RunRows(Rows):
    async def _insert(
        self, tenant: str, endpoint: EndpointRef, kind: str, stable: int, candidate: int,
        spec: str, state: str, creator: str, traffic_start: datetime | None,
    ) -> asyncpg.Record | None:
        try:
            return await self._db.fetchrow(
                """INSERT INTO registry.rollouts (tenant, agent, endpoint, id, kind, stable_version,
                       candidate_version, spec, state, creator, traffic_start_time)
                   VALUES ($1, $2, $3, (SELECT coalesce(max(id), 0) + 1 FROM registry.rollouts
                                        WHERE tenant = $1 AND agent = $2 AND endpoint = $3
                                          AND kind = $4),
                           $4, $5, $6, $7, $8, $9, $10)
                   RETURNING *""",
                tenant, endpoint.agent, endpoint.endpoint, kind, stable, candidate, spec, state, creator,
                traffic_start,
            )
        except asyncpg.UniqueViolationError:
            return None  # another run on the endpoint, or the same id, committed first

    async def insert_rollout(
        self, tenant: str, endpoint: EndpointRef, stable: int, candidate: int, spec: RolloutSpec,
        creator: str,
    ) -> RolloutRecord | None:
        row = await self._insert(tenant, endpoint, _ROLLOUT, stable, candidate, rollout_spec_json(spec),
                                 RolloutState.PROGRESSING.value, creator, None)
        return _rollout(row) if row else None

    async def insert_experiment(
        self, tenant: str, endpoint: EndpointRef, spec: ExperimentSpec, creator: str,
        traffic_start: datetime,
    ) -> ExperimentRecord | None:
        row = await self._insert(
            tenant, endpoint, _EXPERIMENT, spec.control, spec.variants[1].version,
            experiment_spec_json(spec), ExperimentState.RUNNING.value, creator, traffic_start,
        )
        return _experiment(row) if row else None

    async def _get(
        self, tenant: str, endpoint: EndpointRef, kind: str, id: int | None, for_update: bool
    ) -> asyncpg.Record | None:
        lock = " FOR UPDATE" if for_update else ""
        where = "WHERE tenant = $1 AND agent = $2 AND endpoint = $3 AND kind = $4"
        if id is None:
            return await self._db.fetchrow(
                f"SELECT * FROM registry.rollouts {where} ORDER BY id DESC LIMIT 1" + lock,
                tenant, endpoint.agent, endpoint.endpoint, kind,
            )
        return await self._db.fetchrow(
            f"SELECT * FROM registry.rollouts {where} AND id = $5" + lock,
            tenant, endpoint.agent, endpoint.endpoint, kind, id,
        )

    async def get_rollout(
        self, tenant: str, rollout: RolloutRef, *, for_update: bool = False
    ) -> RolloutRecord | None:
        row = await self._get(tenant, rollout.endpoint, _ROLLOUT, rollout.id, for_update)
        return _rollout(row) if row else None

    async def get_experiment(
        self, tenant: str, experiment: ExperimentRef, *, for_update: bool = False
    ) -> ExperimentRecord | None:
        row = await self._get(tenant, experiment.endpoint, _EXPERIMENT, experiment.id, for_update)
        return _experiment(row) if row else None

    async def _list(
        self, tenant: str, endpoint: EndpointRef, kind: str, after: Key | None, limit: int
    ) -> list[asyncpg.Record]:
        return await self._db.fetch(
            "SELECT * FROM registry.rollouts WHERE tenant = $1 AND agent = $2 AND endpoint = $3 "
            "AND kind = $4 AND ($5::bigint IS NULL OR id < $5) ORDER BY id DESC LIMIT $6",
            tenant, endpoint.agent, endpoint.endpoint, kind, key_part(after, 0), limit,
        )

    async def list_rollouts(
        self, tenant: str, endpoint: EndpointRef, after: Key | None, limit: int
    ) -> list[RolloutRecord]:
        return [_rollout(r) for r in await self._list(tenant, endpoint, _ROLLOUT, after, limit)]

    async def list_experiments(
        self, tenant: str, endpoint: EndpointRef, after: Key | None, limit: int
    ) -> list[ExperimentRecord]:
        rows = await self._list(tenant, endpoint, _EXPERIMENT, after, limit)
        return [_experiment(r) for r in rows]

    async def active_runs(self) -> list[RunRecord]:
        rows = await self._db.fetch(
            "SELECT * FROM registry.rollouts WHERE state = ANY($1::text[]) ORDER BY create_time",
            list(ACTIVE_STATES),
        )
        return [run_from_row(r) for r in rows]

    async def recent_runs(self, limit: int = 200) -> list[RunRecord]:
        rows = await self._db.fetch(
            """SELECT DISTINCT ON (tenant, agent, endpoint, kind) * FROM registry.rollouts
               ORDER BY tenant, agent, endpoint, kind, id DESC LIMIT $1""", limit,
        )
        return [run_from_row(r) for r in rows]

    async def due_drains(self) -> list[RolloutRecord]:
        rows = await self._db.fetch(
            """SELECT * FROM registry.rollouts
               WHERE kind = 'rollout' AND state IN ('ROLLED_BACK', 'ABORTED')
                 AND spec->>'rollback_policy' = 'DRAIN' AND NOT coalesce((spec->>'drained')::boolean, false)
                 AND end_time + make_interval(secs => (spec->>'drain_timeout_s')::double precision) < now()""",
        )
        return [_rollout(r) for r in rows]

    async def active_run(self, tenant: str, endpoint: EndpointRef) -> RunRecord | None:
        row = await self._db.fetchrow(
            "SELECT * FROM registry.rollouts WHERE tenant = $1 AND agent = $2 AND endpoint = $3 "
            "AND state = ANY($4::text[]) FOR UPDATE",
            tenant, endpoint.agent, endpoint.endpoint, list(ACTIVE_STATES),
        )
        return run_from_row(row) if row else None

    async def _save(
        self, run: RunRecord, columns: dict[str, object]
    ) -> asyncpg.Record | None:
        sets = ", ".join(f"{column} = ${i}" for i, column in enumerate(columns, start=7))
        return await self._db.fetchrow(
            f"""UPDATE registry.rollouts SET {sets}, update_time = now(), revision = revision + 1
                WHERE tenant = $1 AND agent = $2 AND endpoint = $3 AND kind = $4 AND id = $5
                  AND revision = $6
                RETURNING *""",
            run.tenant, run.endpoint.agent, run.endpoint.endpoint, run.kind, run.id, run.revision,
            *columns.values(),
        )

    async def save_rollout(self, rollout: RolloutRecord) -> RolloutRecord | None:
        analysis = rollout.last_analysis
        row = await self._save(rollout, {
            "spec": rollout_spec_json(rollout.spec), "state": rollout.state.value,
            "state_reason": rollout.state_reason, "current_step": rollout.current_step,
            "current_weight": rollout.current_weight,
            "last_analysis": dumps(analysis) if analysis is not None else None,
            "last_check_time": rollout.last_check_time, "step_start_time": rollout.step_start_time,
            "traffic_start_time": rollout.traffic_start_time, "end_time": rollout.end_time,
        })
        return _rollout(row) if row else None

    async def save_experiment(self, experiment: ExperimentRecord) -> ExperimentRecord | None:
        row = await self._save(experiment, {
            "spec": experiment_spec_json(experiment.spec), "state": experiment.state.value,
            "state_reason": experiment.state_reason,
            "traffic_start_time": experiment.traffic_start_time, "end_time": experiment.end_time,
        })
        return _experiment(row) if row else None

    async def try_lock_run(self, run: RunRecord) -> bool:
        return bool(await self._db.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtext('corral.rollout'), hashtext($1))",
            f"{run.tenant}/{run.name}",
        ))
