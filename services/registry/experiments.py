"""A/B experiments: a fixed split of an endpoint between a control and variants, until a date or
a number of sessions, then concluded by a human with the report's evidence."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

from corral import names
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.identity import Caller
from services.registry.metrics import validate_metrics
from services.registry.rollout_store import RolloutRecord, RolloutStore
from services.registry.rollouts import Notify, Transition, _endpoint, now, parse_rollout_name
from services.registry.store import RegistryStore
from services.registry.traffic import TrafficShare, normalize_split

# (experiment) -> the telemetry analysis as a dict (AnalyzeExperimentResponse's JSON form).
AnalyzeExperiment = Callable[[RolloutRecord], Awaitable[Mapping[str, Any]]]


class Experiments:
    def __init__(self, store: RegistryStore, rollouts: RolloutStore, notify: Notify) -> None:
        self.store = store
        self.rollouts = rollouts
        self.notify = notify

    async def create(
        self, caller: Caller, parent: str, variants: list[tuple[str, float]], metrics: list[dict[str, Any]],
        end_time: datetime | None, max_sessions: int, alpha: float, webhook_url: str,
    ) -> RolloutRecord:
        agent, endpoint = _endpoint(parent, "parent")
        numbers: list[tuple[int, float]] = []
        for i, (version, percent) in enumerate(variants):
            try:
                ref = names.parse_version(version)
            except names.ResourceNameError as exc:
                raise InvalidArgument.field(f"experiment.variants[{i}].version", str(exc)) from None
            if ref.agent != agent:
                raise InvalidArgument.field(f"experiment.variants[{i}].version", f"{version} is not a version of agents/{agent}")
            numbers.append((ref.number, percent))
        if len(numbers) < 2:
            raise InvalidArgument.field("experiment.variants", "needs a control and at least one variant, e.g. 2=80,3=20")
        traffic = normalize_split(numbers)  # adds up to 100, no duplicates
        if end_time is not None and end_time <= now():
            raise InvalidArgument.field("experiment.end_time", "is in the past")
        if max_sessions < 0:
            raise InvalidArgument.field("experiment.max_sessions", "must not be negative")
        if alpha and not 0 < alpha < 1:
            raise InvalidArgument.field("experiment.alpha", f"{alpha} must be in (0, 1)")
        spec = {
            "variants": [[v, p] for v, p in numbers], "metrics": validate_metrics(metrics),
            "end_time": end_time.isoformat() if end_time else None, "max_sessions": max_sessions,
            "alpha": alpha or 0.05, "webhook_url": webhook_url,
        }
        async with self.store.tx() as tx:
            current = await tx.endpoint_for_update(agent, endpoint)
            if current is None:
                raise NotFound(f"{parent} does not exist; create it with `corral endpoint set`")
            wanted = [v for v, _ in numbers]
            missing = sorted(set(wanted) - await tx.existing_versions(agent, wanted))
            if missing:
                raise FailedPrecondition(f"agents/{agent} has no version {', '.join(map(str, missing))}",
                                         reason="VERSION_NOT_FOUND")
            record = await self.rollouts.insert(
                tx.conn, agent, endpoint, "experiment", numbers[0][0], numbers[1][0], spec, "RUNNING", caller.user)
            await tx.put_endpoint(agent, endpoint, traffic)
            record = await self.rollouts.update(tx.conn, record, traffic_start_time=now())
            await tx.audit(caller.tenant, caller.user, "CreateExperiment", record.name,
                           {"variants": {str(v): p for v, p in numbers}})
        self.notify(Transition(record, "STARTED", caller.user))
        return record

    async def get(self, name: str) -> RolloutRecord:
        agent, endpoint, eid = parse_rollout_name(name, "experiment")
        record = await self.rollouts.get(self.store.pool, agent, endpoint, "experiment", eid)
        if record is None:
            raise NotFound(f"{name} does not exist; `corral experiment list {agent} {endpoint}` lists them")
        return record

    async def list(self, parent: str, offset: int, limit: int) -> list[RolloutRecord]:
        agent, endpoint = _endpoint(parent, "parent")
        return await self.rollouts.list(self.store.pool, agent, endpoint, "experiment", offset, limit)

    async def conclude(self, caller: Caller, name: str, winner: str, keep_control: bool,
                       evidence: Mapping[str, Any] | None) -> RolloutRecord:
        agent, endpoint, eid = parse_rollout_name(name, "experiment")
        if bool(winner) == keep_control:
            raise InvalidArgument.field("winner", "give exactly one of winner or keep_control")
        async with self.store.tx() as tx:
            await tx.endpoint_for_update(agent, endpoint)  # endpoint before experiment, as everywhere
            r = await self.rollouts.get(tx.conn, agent, endpoint, "experiment", eid, for_update=True)
            if r is None:
                raise NotFound(f"{name} does not exist")
            if r.state == "CONCLUDED":
                raise FailedPrecondition(f"{r.name} was already concluded", reason="EXPERIMENT_ENDED")
            variants = [int(v) for v, _ in r.spec["variants"]]
            if keep_control:
                chosen = variants[0]
            else:
                try:
                    chosen = names.parse_version(winner).number
                except names.ResourceNameError as exc:
                    raise InvalidArgument.field("winner", str(exc)) from None
                if chosen not in variants:
                    raise InvalidArgument.field("winner", f"{winner} is not a variant of {r.name}")
            await tx.put_endpoint(agent, endpoint, (TrafficShare(chosen, 10_000),))
            spec = {**r.spec, "winner": chosen}
            updated = await self.rollouts.update(
                tx.conn, r, state="CONCLUDED", spec=spec, end_time=now(),
                state_reason=f"concluded by {caller.user}: " + ("kept the control" if keep_control else f"winner v{chosen}"),
            )
            await tx.audit(caller.tenant, caller.user, "ConcludeExperiment", r.name,
                           {"winner": chosen, "keep_control": keep_control, "evidence": evidence})
        self.notify(Transition(updated, "CONCLUDED", caller.user, evidence))
        return updated

    async def check_complete(self, r: RolloutRecord, sessions: int) -> RolloutRecord | None:
        """RUNNING → COMPLETE when its end time passed or it saw max_sessions; the split stays
        until someone concludes it."""
        end = r.spec.get("end_time")
        due = (end is not None and now() >= datetime.fromisoformat(end)) or (
            r.spec.get("max_sessions") and sessions >= int(r.spec["max_sessions"]))
        if not due:
            return None
        async with self.store.tx() as tx:
            current = await self.rollouts.get(tx.conn, r.agent, r.endpoint, "experiment", r.id, for_update=True)
            if current is None or current.state != "RUNNING":
                return None
            updated = await self.rollouts.update(
                tx.conn, current, state="COMPLETE",
                state_reason="reached its end time" if end and now() >= datetime.fromisoformat(end)
                else f"reached {sessions} sessions")
        self.notify(Transition(updated, "COMPLETE", "corral-controller"))
        return updated
