"""Rollouts: a progressive change of an endpoint from its stable version to a candidate, and the
explicit actions on it (promote, pause, resume, abort, rollback). The controller advances them."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial

from corral.names import EndpointRef, ExperimentRef, RolloutRef, VersionRef
from services.common.clock import Clock, SystemClock
from services.common.endpoints import BASIS_POINTS, TrafficShare
from services.common.errors import CorralError, FailedPrecondition, NotFound
from services.common.identity import Caller
from services.common.outbound import OutboundPolicy
from services.common.paging import Page
from services.registry import rollout_machine, rollout_rules
from services.registry.destinations import check_destination
from services.registry.model import (
    EndpointRecord,
    Paging,
    RegistryStore,
    RegistryTx,
    SessionRetirement,
    read_page,
)
from services.registry.publishing import check_routable
from services.registry.rollout_model import (
    Analysis,
    ExperimentRecord,
    ExperimentState,
    Notify,
    RolloutRecord,
    RolloutRequest,
    RolloutState,
    RunRecord,
    SessionPolicy,
    Transition,
)
from services.registry.tenancy import tenant_of

log = logging.getLogger(__name__)


def split_for(stable: int, candidate: int, weight: float) -> tuple[TrafficShare, ...]:
    bp = round(weight * 100)
    if bp >= BASIS_POINTS:
        return (TrafficShare(candidate, BASIS_POINTS),)
    if bp <= 0:
        return (TrafficShare(stable, BASIS_POINTS),)
    shares = (TrafficShare(stable, BASIS_POINTS - bp), TrafficShare(candidate, bp))
    return tuple(sorted(shares, key=lambda s: s.version))


def run_changed(run: RunRecord) -> FailedPrecondition:
    return FailedPrecondition(f"{run.name} changed while it was being updated; retry",
                              reason="ROLLOUT_CHANGED")


def run_not_found(run: RolloutRef | ExperimentRef) -> NotFound:
    command = "rollout" if isinstance(run, RolloutRef) else "experiment"
    return NotFound(
        f"{run.name} does not exist; `corral {command} list {run.agent} {run.endpoint.endpoint}` "
        "lists them"
    )


def endpoint_not_found(endpoint: EndpointRef) -> NotFound:
    return NotFound(f"{endpoint.name} does not exist; create it with `corral endpoint set`")


def run_in_the_way(running: RunRecord, endpoint: EndpointRef) -> FailedPrecondition:
    return FailedPrecondition(
        f"{running.name} is still {running.state.value.lower()} on {endpoint.name}; promote, "
        "abort or conclude it first",
        reason="ROLLOUT_RUNNING", metadata={"running": running.name},
    )


def started_just_now(endpoint: EndpointRef) -> FailedPrecondition:
    return FailedPrecondition(
        f"another rollout or experiment started on {endpoint.name} just now",
        reason="ROLLOUT_RUNNING",
    )


async def save(tx: RegistryTx, rollout: RolloutRecord) -> RolloutRecord:
    saved = await tx.save_rollout(rollout)
    if saved is None:
        raise run_changed(rollout)
    return saved


# What one explicit action does to a rollout: the rollout after it, and the event to announce.
Change = Callable[[RegistryTx, RolloutRecord], Awaitable[tuple[RolloutRecord, str]]]


class RunDomain:
    """What the rollouts and experiments domains share: the store their runs live in, how a
    transition is announced once its transaction has committed, and the clock."""

    def __init__(self, store: RegistryStore, notify: Notify, clock: Clock | None,
                 outbound: OutboundPolicy | None = None) -> None:
        self._store = store
        self._notify = notify
        self.clock = clock or SystemClock()
        self._outbound = outbound or OutboundPolicy()

    async def check_webhook(self, url: str, field: str) -> None:
        """Refuses a webhook the outbound policy would never deliver to (INVALID_ARGUMENT)."""
        if url:
            await check_destination(self._outbound, rollout_rules.webhook_target(url, field), field)

    def announce(self, transition: Transition) -> None:
        """Announces a transition whose transaction has committed."""
        self._notify(transition)


class Rollouts(RunDomain):
    def __init__(self, store: RegistryStore, notify: Notify, sessions: SessionRetirement,
                 clock: Clock | None = None, *, outbound: OutboundPolicy | None = None) -> None:
        super().__init__(store, notify, clock, outbound)
        self._sessions = sessions
        # Runs the controller's next tick now; the app points it at the controller.
        self.kick: Callable[[], None] = lambda: None

    # -- reading ---------------------------------------------------------------------------

    async def get(self, caller: Caller, rollout: RolloutRef) -> RolloutRecord:
        record = await self._store.get_rollout(tenant_of(caller), rollout)
        if record is None:
            raise run_not_found(rollout)
        return record

    async def list_rollouts(self, endpoint: EndpointRef, paging: Paging) -> Page[RolloutRecord]:
        rows = partial(self._store.list_rollouts, tenant_of(paging.who), endpoint)
        return await read_page(paging, "ListRollouts", endpoint, (int,), rows, key=lambda r: (r.id,))

    # -- creating --------------------------------------------------------------------------

    async def create(
        self, caller: Caller, endpoint: EndpointRef, request: RolloutRequest
    ) -> RolloutRecord:
        candidate = request.candidate
        rollout_rules.check_candidate(endpoint, candidate)
        spec = rollout_rules.rollout_spec(request)
        await self.check_webhook(spec.webhook_url, "rollout.webhook_url")
        tenant = tenant_of(caller)
        async with self._store.tx() as tx:
            current = await tx.get_endpoint(tenant, endpoint, for_update=True)
            if current is None:
                raise endpoint_not_found(endpoint)
            await check_routable(tx, tenant, endpoint.parent, [candidate.number])
            running = await tx.active_run(tenant, endpoint)
            if running is not None:
                raise run_in_the_way(running, endpoint)
            if len(current.traffic) != 1:
                raise FailedPrecondition(
                    f"{endpoint.name} is split between versions; set it to one stable version "
                    "before a rollout",
                    reason="ENDPOINT_SPLIT",
                )
            stable = current.traffic[0].version
            if stable == candidate.number:
                raise FailedPrecondition(
                    f"{candidate.name} is already the stable version of {endpoint.name}",
                    reason="ALREADY_STABLE",
                )
            record = await tx.insert_rollout(tenant, endpoint, stable, candidate.number, spec,
                                             caller.user)
            if record is None:
                raise started_just_now(endpoint)
            await tx.audit(caller, "CreateRollout", record.name,
                           {"stable": stable, "candidate": candidate.number, "strategy": spec.strategy})
        self._notify(Transition(record, "STARTED", caller.user))
        self.kick()
        return record

    # -- explicit actions ------------------------------------------------------------------

    async def _act(
        self, caller: Caller, rollout: RolloutRef, method: str, change: Change
    ) -> RolloutRecord:
        tenant = tenant_of(caller)
        async with self._store.tx() as tx:
            # The endpoint row before the rollout's, as everywhere.
            await tx.get_endpoint(tenant, rollout.endpoint, for_update=True)
            record = await tx.get_rollout(tenant, rollout, for_update=True)
            if record is None:
                raise NotFound(f"{rollout.name} does not exist")
            rollout_machine.check_active(record)
            updated, event = await change(tx, record)
            await tx.audit(caller, method, record.name, {
                "state": updated.state.value, "weight": updated.current_weight,
                "reason": updated.state_reason, "evidence": record.last_analysis,
            })
        self._notify(Transition(updated, event, caller.user, record.last_analysis))
        self.kick()
        return updated

    async def promote(self, caller: Caller, rollout: RolloutRef, full: bool) -> RolloutRecord:
        async def change(tx: RegistryTx, r: RolloutRecord) -> tuple[RolloutRecord, str]:
            if full:
                return await self.finish(tx, r, f"promoted to 100% by {caller.user}"), "PROMOTED"
            promoted = rollout_machine.promoted(r, caller.user, self.clock.now())
            return await save(tx, promoted), "PROMOTED"
        return await self._act(caller, rollout, "PromoteRollout", change)

    async def pause(self, caller: Caller, rollout: RolloutRef, reason: str) -> RolloutRecord:
        async def change(tx: RegistryTx, r: RolloutRecord) -> tuple[RolloutRecord, str]:
            paused = rollout_machine.paused(r, reason or f"paused by {caller.user}")
            return await save(tx, paused), "PAUSED"
        return await self._act(caller, rollout, "PauseRollout", change)

    async def resume(self, caller: Caller, rollout: RolloutRef) -> RolloutRecord:
        async def change(tx: RegistryTx, r: RolloutRecord) -> tuple[RolloutRecord, str]:
            resumed = rollout_machine.resumed(r, caller.user, self.clock.now())
            return await save(tx, resumed), "RESUMED"
        return await self._act(caller, rollout, "ResumeRollout", change)

    async def abort(self, caller: Caller, rollout: RolloutRef, reason: str) -> RolloutRecord:
        async def change(tx: RegistryTx, r: RolloutRecord) -> tuple[RolloutRecord, str]:
            ended = await self.end_on_stable(
                tx, r, RolloutState.ABORTED, reason or f"aborted by {caller.user}")
            return ended, "ABORTED"
        return await self._act(caller, rollout, "AbortRollout", change)

    # -- effects shared with the controller ------------------------------------------------

    async def set_weight(
        self, tx: RegistryTx, r: RolloutRecord, weight: float, step: int
    ) -> RolloutRecord:
        await tx.put_endpoint(r.tenant, r.endpoint,
                              split_for(r.stable_version, r.candidate_version, weight))
        t = self.clock.now()
        return await save(tx, replace(
            r, current_weight=weight, current_step=step, step_start_time=t,
            traffic_start_time=r.traffic_start_time or t,
        ))

    async def finish(self, tx: RegistryTx, r: RolloutRecord, reason: str) -> RolloutRecord:
        await tx.put_endpoint(r.tenant, r.endpoint,
                              split_for(r.stable_version, r.candidate_version, 100))
        return await save(tx, replace(
            r, state=RolloutState.SUCCEEDED, state_reason=reason, current_weight=100.0,
            current_step=len(r.spec.steps), end_time=self.clock.now(),
        ))

    async def end_on_stable(
        self, tx: RegistryTx, r: RolloutRecord, state: RolloutState, reason: str,
        analysis: Analysis | None = None,
    ) -> RolloutRecord:
        await tx.put_endpoint(r.tenant, r.endpoint,
                              split_for(r.stable_version, r.candidate_version, 0))
        return await save(tx, replace(
            r, state=state, state_reason=reason, current_weight=0.0, end_time=self.clock.now(),
            last_analysis=analysis if analysis is not None else r.last_analysis,
        ))

    async def abort_for_manual_change(
        self, tx: RegistryTx, endpoint: EndpointRef, caller: Caller,
        traffic: tuple[TrafficShare, ...],
    ) -> Transition | None:
        """A manual `endpoint set` (to `traffic`) during a rollout or experiment aborts it
        (audited as such). Returns the transition to announce once the caller's transaction has
        committed."""
        run = await tx.active_run(tenant_of(caller), endpoint)
        if run is None:
            return None
        reason = f"aborted: endpoint set manually by {caller.user}"
        ended: RunRecord
        if isinstance(run, ExperimentRecord):
            ended = await self._end_experiment(tx, run, reason)
        else:
            # The rollout shows the candidate's share of what was set, not its last step's.
            candidate = sum(s.percent for s in traffic if s.version == run.candidate_version)
            ended = await save(tx, replace(
                run, state=RolloutState.ABORTED, state_reason=reason, current_weight=candidate,
                end_time=self.clock.now()))
        await tx.audit(caller, "AbortRollout", run.name, {"reason": reason})
        return Transition(ended, "ABORTED", caller.user)

    async def _end_experiment(
        self, tx: RegistryTx, experiment: ExperimentRecord, reason: str
    ) -> ExperimentRecord:
        """An experiment that a manual change of its endpoint ends before its conclusion."""
        ended = await tx.save_experiment(replace(
            experiment, state=ExperimentState.ABORTED, state_reason=reason,
            end_time=self.clock.now()))
        if ended is None:
            raise run_changed(experiment)
        return ended

    async def rollback_endpoint(
        self, caller: Caller, endpoint: EndpointRef, version: VersionRef | None,
        policy: SessionPolicy,
    ) -> EndpointRecord:
        """Back to the last stable version (or `version`), applying the session policy to the
        sessions of the versions it leaves."""
        tenant = tenant_of(caller)
        async with self._store.tx() as tx:
            current = await tx.get_endpoint(tenant, endpoint, for_update=True)
            if current is None:
                raise endpoint_not_found(endpoint)
            running = await tx.active_run(tenant, endpoint)
            if version is not None:
                target = version.number
                await check_routable(tx, tenant, endpoint.parent, [target])
            elif running is not None:
                target = running.stable_version
            else:
                serving = current.traffic[0].version if len(current.traffic) == 1 else -1
                found = await tx.last_stable(tenant, endpoint, serving)
                if found is None:
                    raise FailedPrecondition(
                        f"{endpoint.name} has no earlier stable version to roll back to; give "
                        "--to VERSION",
                        reason="NO_STABLE_VERSION",
                    )
                target = found
            evidence = running.last_analysis if isinstance(running, RolloutRecord) else None
            serving_stable = None
            transition = None
            if running is not None:
                reason = f"rolled back by {caller.user}"
                updated: RunRecord
                if isinstance(running, RolloutRecord):
                    updated = await self.end_on_stable(tx, running, RolloutState.ROLLED_BACK, reason)
                    serving_stable = running.stable_version
                else:
                    updated = await self._end_experiment(tx, running, reason)
                await tx.audit(caller, "RollbackRollout", running.name,
                               {"to": target, "policy": policy.value, "evidence": evidence})
                transition = Transition(updated, "ROLLED_BACK", caller.user, evidence)
            if target != serving_stable:
                await tx.put_endpoint(tenant, endpoint, (TrafficShare(target, BASIS_POINTS),))
            await tx.audit(caller, "RollbackEndpoint", endpoint.name,
                           {"to": target, "policy": policy.value, "evidence": evidence})
        if transition is not None:
            self._notify(transition)
        for share in current.traffic:
            if share.version != target:
                await self.retire_sessions(tenant, endpoint, share.version, policy, target)
        after = await self._store.get_endpoint(tenant, endpoint)
        if after is None:
            raise endpoint_not_found(endpoint)
        return after

    # -- session policies ------------------------------------------------------------------

    async def retire_sessions(
        self, tenant: str, endpoint: EndpointRef, version: int, policy: SessionPolicy,
        to_version: int,
    ) -> int:
        """Applies a session policy to the sessions of `version` on the endpoint: drain (nothing
        now; stopped after the drain timeout), migrate (to `to_version`) or stop. Returns how
        many sessions it moved or stopped; a sessions service that cannot be reached is logged,
        never fatal."""
        if policy is SessionPolicy.DRAIN:
            return 0
        leaving = VersionRef(endpoint.agent, version)
        migrate_to = None
        digest = ""
        if policy is SessionPolicy.MIGRATE:
            migrate_to = VersionRef(endpoint.agent, to_version)
            target = await self._store.get_version(tenant, migrate_to)
            digest = target.digest if target else ""
        try:
            count = await self._sessions.retire_version(tenant, leaving, endpoint, migrate_to, digest)
        except CorralError as exc:
            log.error("could not apply the %s policy to %s sessions: %s", policy.value,
                      leaving.name, exc.message)
            return 0
        log.info("%s: %d sessions on %s (%s)", policy.value.lower(), count, leaving.name,
                 endpoint.endpoint)
        return count

    async def after_rollback(self, r: RolloutRecord, policy: SessionPolicy | None = None) -> None:
        """The session policy (the rollout's own unless given) for a rolled-back candidate."""
        await self.retire_sessions(r.tenant, r.endpoint, r.candidate_version,
                                   policy or r.spec.rollback_policy, r.stable_version)

