"""Rollouts: a progressive change of an endpoint from its stable version to a candidate, and the
explicit actions on it (promote, pause, resume, abort, rollback). The controller advances them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from corral import names
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.identity import Caller
from services.registry.metrics import validate_metrics
from services.registry.rollout_store import RolloutRecord, RolloutStore
from services.registry.store import RegistryStore, Tx
from services.registry.strategies import build_steps, validate_steps
from services.registry.traffic import TrafficShare

log = logging.getLogger(__name__)

POLICIES = ("DRAIN", "MIGRATE", "STOP")
DEFAULT_INTERVAL_S = 30
DEFAULT_MIN_SESSIONS = 100
DEFAULT_ALPHA = 0.05
DEFAULT_DRAIN_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Transition:
    """A state change to announce (webhook, log) once its transaction has committed."""

    rollout: RolloutRecord
    event: str
    actor: str
    evidence: Mapping[str, Any] | None = None


Notify = Callable[[Transition], None]


def now() -> datetime:
    return datetime.now(UTC)


def split_for(stable: int, candidate: int, weight: float) -> tuple[TrafficShare, ...]:
    bp = round(weight * 100)
    if bp >= 10_000:
        return (TrafficShare(candidate, 10_000),)
    if bp <= 0:
        return (TrafficShare(stable, 10_000),)
    return tuple(sorted((TrafficShare(stable, 10_000 - bp), TrafficShare(candidate, bp)), key=lambda s: s.version))


def parse_rollout_name(name: str, kind: str = "rollout") -> tuple[str, str, int | None]:
    plural = "rollouts" if kind == "rollout" else "experiments"
    parts = name.split("/")
    if len(parts) != 6 or parts[4] != plural:
        raise InvalidArgument.field("name", f"{name!r} is not agents/{{agent}}/endpoints/{{endpoint}}/{plural}/{{id}}")
    try:
        agent, endpoint = names.parse_endpoint("/".join(parts[:4]))
    except names.ResourceNameError as exc:
        raise InvalidArgument.field("name", str(exc)) from None
    if parts[5] == "-":
        return agent, endpoint, None
    if not parts[5].isdigit():
        raise InvalidArgument.field("name", f"{parts[5]!r} is not a {kind} id (a number, or - for the newest)")
    return agent, endpoint, int(parts[5])


class Rollouts:
    def __init__(self, store: RegistryStore, rollouts: RolloutStore, notify: Notify) -> None:
        self.store = store
        self.rollouts = rollouts
        self.notify = notify
        self.kick: Callable[[], None] = lambda: None
        # (agent, endpoint, from_version, policy, to_version): applies a session policy after a
        # manual rollback; set by the app (the registry calls sessions for it).
        self.retire: Callable[[str, str, int, str, int], Any] | None = None

    # -- reading ---------------------------------------------------------------------------

    async def get(self, name: str) -> RolloutRecord:
        agent, endpoint, rid = parse_rollout_name(name)
        record = await self.rollouts.get(self.store.pool, agent, endpoint, "rollout", rid)
        if record is None:
            raise NotFound(f"{name} does not exist; `corral rollout list {agent} {endpoint}` lists them")
        return record

    async def list(self, parent: str, offset: int, limit: int) -> list[RolloutRecord]:
        agent, endpoint = _endpoint(parent, "parent")
        return await self.rollouts.list(self.store.pool, agent, endpoint, "rollout", offset, limit)

    # -- creating --------------------------------------------------------------------------

    async def create(self, caller: Caller, parent: str, candidate_name: str, spec: dict[str, Any]) -> RolloutRecord:
        agent, endpoint = _endpoint(parent, "parent")
        try:
            cand = names.parse_version(candidate_name)
        except names.ResourceNameError as exc:
            raise InvalidArgument.field("rollout.candidate_version", str(exc)) from None
        if cand.agent != agent:
            raise InvalidArgument.field("rollout.candidate_version", f"{candidate_name} is not a version of agents/{agent}")
        spec = self._validated_spec(spec)
        async with self.store.tx() as tx:
            current = await tx.endpoint_for_update(agent, endpoint)
            if current is None:
                raise NotFound(f"{parent} does not exist; create it with `corral endpoint set`")
            if not await tx.existing_versions(agent, [cand.number]):
                raise FailedPrecondition(f"{candidate_name} does not exist; publish it first", reason="VERSION_NOT_FOUND")
            running = await self.rollouts.active_for_endpoint(tx.conn, agent, endpoint)
            if running is not None:
                raise FailedPrecondition(
                    f"{running.name} is still {running.state.lower()} on {parent}; promote, abort or "
                    "conclude it first", reason="ROLLOUT_RUNNING", metadata={"running": running.name},
                )
            if len(current.traffic) != 1:
                raise FailedPrecondition(
                    f"{parent} is split between versions; set it to one stable version before a rollout",
                    reason="ENDPOINT_SPLIT",
                )
            stable = current.traffic[0].version
            if stable == cand.number:
                raise FailedPrecondition(
                    f"{candidate_name} is already the stable version of {parent}", reason="ALREADY_STABLE"
                )
            record = await self.rollouts.insert(
                tx.conn, agent, endpoint, "rollout", stable, cand.number, spec, "PROGRESSING", caller.user
            )
            await tx.audit(caller.tenant, caller.user, "CreateRollout", record.name,
                           {"stable": stable, "candidate": cand.number, "strategy": spec.get("strategy")})
        self.notify(Transition(record, "STARTED", caller.user))
        self.kick()
        return record

    @staticmethod
    def _validated_spec(spec: dict[str, Any]) -> dict[str, Any]:
        strategy = spec.get("strategy") or ("custom" if spec.get("steps") else "canary")
        gate = int(spec.get("gate_max_s") or 3600)
        steps = validate_steps(spec["steps"]) if spec.get("steps") else build_steps(strategy, gate)
        analysis = dict(spec.get("analysis") or {})
        analysis["metrics"] = validate_metrics(analysis.get("metrics") or [])
        analysis.setdefault("interval_s", DEFAULT_INTERVAL_S)
        analysis.setdefault("min_sessions", DEFAULT_MIN_SESSIONS)
        analysis.setdefault("alpha", DEFAULT_ALPHA)
        if analysis["interval_s"] <= 0:
            raise InvalidArgument.field("rollout.analysis.interval", "must be a positive duration")
        if analysis["min_sessions"] < 0:
            raise InvalidArgument.field("rollout.analysis.min_sessions", "must not be negative")
        if not 0 < analysis["alpha"] < 1:
            raise InvalidArgument.field("rollout.analysis.alpha", f"{analysis['alpha']} must be in (0, 1)")
        policy = spec.get("rollback_policy") or "DRAIN"
        if policy not in POLICIES:
            raise InvalidArgument.field("rollout.rollback_policy", f"{policy!r} is not one of {', '.join(POLICIES)}")
        drain = int(spec.get("drain_timeout_s") or DEFAULT_DRAIN_TIMEOUT_S)
        return {"strategy": strategy, "steps": steps, "analysis": analysis, "rollback_policy": policy,
                "drain_timeout_s": drain, "webhook_url": spec.get("webhook_url", "")}

    # -- explicit actions ------------------------------------------------------------------

    async def _act(
        self, caller: Caller, name: str, method: str,
        change: Callable[[Tx, RolloutRecord], Any],
    ) -> RolloutRecord:
        agent, endpoint, rid = parse_rollout_name(name)
        async with self.store.tx() as tx:
            await tx.endpoint_for_update(agent, endpoint)  # endpoint before rollout, as everywhere
            record = await self.rollouts.get(tx.conn, agent, endpoint, "rollout", rid, for_update=True)
            if record is None:
                raise NotFound(f"{name} does not exist")
            if not record.active:
                raise FailedPrecondition(
                    f"{record.name} has already ended ({record.state.lower()}); start a new rollout",
                    reason="ROLLOUT_ENDED",
                )
            updated, event = await change(tx, record)
            await tx.audit(caller.tenant, caller.user, method, record.name, {
                "state": updated.state, "weight": updated.current_weight, "reason": updated.state_reason,
                "evidence": record.last_analysis,
            })
        self.notify(Transition(updated, event, caller.user, record.last_analysis))
        self.kick()
        return updated

    async def promote(self, caller: Caller, name: str, full: bool) -> RolloutRecord:
        async def change(tx: Tx, r: RolloutRecord) -> tuple[RolloutRecord, str]:
            if full:
                return await self.finish(tx, r, f"promoted to 100% by {caller.user}"), "PROMOTED"
            step = _next_gate_end(r)
            return await self.rollouts.update(
                tx.conn, r, state="PROGRESSING", state_reason=f"promoted past step {r.current_step} by {caller.user}",
                current_step=step, step_start_time=now(),
            ), "PROMOTED"
        return await self._act(caller, name, "PromoteRollout", change)

    async def pause(self, caller: Caller, name: str, reason: str) -> RolloutRecord:
        async def change(tx: Tx, r: RolloutRecord) -> tuple[RolloutRecord, str]:
            return await self.rollouts.update(
                tx.conn, r, state="PAUSED", state_reason=reason or f"paused by {caller.user}"), "PAUSED"
        return await self._act(caller, name, "PauseRollout", change)

    async def resume(self, caller: Caller, name: str) -> RolloutRecord:
        async def change(tx: Tx, r: RolloutRecord) -> tuple[RolloutRecord, str]:
            if r.state != "PAUSED":
                raise FailedPrecondition(f"{r.name} is not paused", reason="NOT_PAUSED")
            step = r.current_step
            steps = r.spec["steps"]
            # Resuming a manual gate, or a gate that timed out, moves past it.
            if step < len(steps) and ("manual" in steps[step] or "analysis" in steps[step]):
                step += 1
            return await self.rollouts.update(
                tx.conn, r, state="PROGRESSING", state_reason=f"resumed by {caller.user}",
                current_step=step, step_start_time=now()), "RESUMED"
        return await self._act(caller, name, "ResumeRollout", change)

    async def abort(self, caller: Caller, name: str, reason: str) -> RolloutRecord:
        async def change(tx: Tx, r: RolloutRecord) -> tuple[RolloutRecord, str]:
            return await self.end_on_stable(tx, r, "ABORTED", reason or f"aborted by {caller.user}"), "ABORTED"
        return await self._act(caller, name, "AbortRollout", change)

    # -- effects shared with the controller ------------------------------------------------

    async def set_weight(self, tx: Tx, r: RolloutRecord, weight: float, step: int) -> RolloutRecord:
        await tx.put_endpoint(r.agent, r.endpoint, split_for(r.stable_version, r.candidate_version, weight))
        t = now()
        return await self.rollouts.update(
            tx.conn, r, current_weight=weight, current_step=step, step_start_time=t,
            traffic_start_time=r.traffic_start_time or t,
        )

    async def finish(self, tx: Tx, r: RolloutRecord, reason: str) -> RolloutRecord:
        await tx.put_endpoint(r.agent, r.endpoint, split_for(r.stable_version, r.candidate_version, 100))
        return await self.rollouts.update(
            tx.conn, r, state="SUCCEEDED", state_reason=reason, current_weight=100.0,
            current_step=len(r.spec["steps"]), end_time=now(),
        )

    async def end_on_stable(self, tx: Tx, r: RolloutRecord, state: str, reason: str, analysis: Any = None) -> RolloutRecord:
        await tx.put_endpoint(r.agent, r.endpoint, split_for(r.stable_version, r.candidate_version, 0))
        changes: dict[str, Any] = {"state": state, "state_reason": reason, "current_weight": 0.0, "end_time": now()}
        if analysis is not None:
            changes["last_analysis"] = analysis
        return await self.rollouts.update(tx.conn, r, **changes)

    async def abort_for_manual_change(
        self, tx: Tx, agent: str, endpoint: str, caller: Caller
    ) -> Transition | None:
        """A manual `endpoint set` during a rollout aborts it (audited as such). Returns the
        transition to announce once the caller's transaction has committed."""
        r = await self.rollouts.active_for_endpoint(tx.conn, agent, endpoint)
        if r is None:
            return None
        reason = f"aborted: endpoint set manually by {caller.user}"
        updated = await self.rollouts.update(tx.conn, r, state="ABORTED", state_reason=reason, end_time=now())
        await tx.audit(caller.tenant, caller.user, "AbortRollout", r.name, {"reason": reason})
        return Transition(updated, "ABORTED", caller.user)

    async def rollback_endpoint(
        self, caller: Caller, name: str, version: str, policy: str
    ) -> tuple[str, str, int]:
        """Back to the last stable version (or `version`). Returns (agent, endpoint, version)."""
        agent, endpoint = _endpoint(name, "name")
        async with self.store.tx() as tx:
            current = await tx.endpoint_for_update(agent, endpoint)
            if current is None:
                raise NotFound(f"{name} does not exist")
            running = await self.rollouts.active_for_endpoint(tx.conn, agent, endpoint)
            if version:
                try:
                    target = names.parse_version(version).number
                except names.ResourceNameError as exc:
                    raise InvalidArgument.field("version", str(exc)) from None
                if not await tx.existing_versions(agent, [target]):
                    raise FailedPrecondition(f"{version} does not exist", reason="VERSION_NOT_FOUND")
            elif running is not None:
                target = running.stable_version
            else:
                serving = current.traffic[0].version if len(current.traffic) == 1 else -1
                found = await self.rollouts.last_stable(tx.conn, agent, endpoint, serving)
                if found is None:
                    raise FailedPrecondition(
                        f"{name} has no earlier stable version to roll back to; give --to VERSION",
                        reason="NO_STABLE_VERSION",
                    )
                target = found
            if running is not None:
                updated = await self.end_on_stable(
                    tx, running, "ROLLED_BACK", f"rolled back by {caller.user}")
                await tx.audit(caller.tenant, caller.user, "RollbackRollout", running.name,
                               {"to": target, "policy": policy, "evidence": running.last_analysis})
                if target != running.stable_version:
                    await tx.put_endpoint(agent, endpoint, (TrafficShare(target, 10_000),))
                self.notify(Transition(updated, "ROLLED_BACK", caller.user, running.last_analysis))
            else:
                await tx.put_endpoint(agent, endpoint, (TrafficShare(target, 10_000),))
            await tx.audit(caller.tenant, caller.user, "RollbackEndpoint", name, {
                "to": target, "policy": policy,
                "evidence": running.last_analysis if running is not None else None,
            })
        if self.retire is not None:
            for share in current.traffic:
                if share.version != target:
                    await self.retire(agent, endpoint, share.version, policy, target)
        return agent, endpoint, target


def _endpoint(name: str, field: str) -> tuple[str, str]:
    try:
        return names.parse_endpoint(name)
    except names.ResourceNameError as exc:
        raise InvalidArgument.field(field, str(exc)) from None


def _next_gate_end(r: RolloutRecord) -> int:
    """The step after the current gate (or the current step when it is not a gate)."""
    steps = r.spec["steps"]
    step = r.current_step
    if step < len(steps) and "set_weight" not in steps[step]:
        return step + 1
    return step


__all__ = ["RolloutRecord", "Rollouts", "Transition"]
