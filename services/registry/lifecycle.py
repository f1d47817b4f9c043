"""Deleting agents, versions and endpoints, and the retention of unused versions: a version an
endpoint routes to or keeps for rollback, that a running rollout or experiment uses, or that
active sessions are pinned to is never deleted. Bundles go when no version of any tenant has
their digest; executors hear of it on the endpoint watch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from itertools import groupby

from corral.names import AgentRef, EndpointRef, VersionRef
from services.common.clock import Clock, SystemClock
from services.common.errors import CorralError, FailedPrecondition, NotFound
from services.common.identity import Caller
from services.registry import lifecycle_rules as rules
from services.registry.lifecycle_model import (
    Blockers,
    LifecycleStore,
    LifecycleTx,
    PinnedSessions,
    RetentionCandidate,
)
from services.registry.registry import agent_missing, check_etag
from services.registry.rules import DEFAULT_ENDPOINT
from services.registry.tenancy import acting_for, tenant_of

log = logging.getLogger(__name__)

DEFAULT_RETENTION_DAYS = 45


def _version_missing(version: VersionRef) -> NotFound:
    return NotFound(f"{version.name} does not exist; `corral versions {version.agent}` lists them")


class Lifecycle:
    def __init__(
        self, store: LifecycleStore, sessions: PinnedSessions, *,
        retention_days: int = DEFAULT_RETENTION_DAYS, clock: Clock | None = None,
    ) -> None:
        self._store = store
        self._sessions = sessions
        self.retention_days = retention_days
        self._clock = clock or SystemClock()

    # -- deleting --------------------------------------------------------------------------

    async def delete_agent(self, caller: Caller, agent: AgentRef, *, force: bool) -> None:
        tenant = tenant_of(caller)
        async with self._store.tx() as tx:
            if not await tx.lock_agent(tenant, agent):
                raise agent_missing(agent)
            numbers = await tx.version_numbers(tenant, agent)
            if numbers and not force:
                raise rules.has_versions(agent.name, len(numbers))
            runs = await tx.agent_runs(tenant, agent)
            if runs:
                raise rules.runs_running(agent.name, runs)
            pins = await self._active_sessions(tenant, [agent.version(n) for n in numbers])
            if pins:
                raise rules.in_use(agent.name, Blockers(sessions=pins))
            endpoints = await tx.watched_endpoints(tenant, agent)
            for endpoint in endpoints:
                await tx.delete_endpoint(tenant, endpoint.ref, endpoint.revision)
            removed = await self._remove(tx, tenant, agent, numbers)
            await tx.delete_agent(tenant, agent)
            await tx.audit(caller, "DeleteAgent", agent.name, {
                "force": force, "versions": numbers,
                "endpoints": [e.id for e in endpoints], "bundles_removed": removed,
            })
        log.info("deleted %s (%d versions) in tenant %s", agent.name, len(numbers), tenant)

    async def delete_version(self, caller: Caller, version: VersionRef) -> None:
        tenant = tenant_of(caller)
        agent = version.parent
        async with self._store.tx() as tx:
            # Endpoint changes lock the agent too: none can start routing to it meanwhile.
            if not await tx.lock_agent(tenant, agent):
                raise _version_missing(version)
            record = await tx.get_version(tenant, version)
            if record is None:
                raise _version_missing(version)
            found = rules.blockers(
                [version.number], await tx.watched_endpoints(tenant, agent),
                await tx.agent_runs(tenant, agent),
                await self._active_sessions(tenant, [version]),
            )
            if found:
                raise rules.in_use(version.name, found)
            removed = await self._remove(tx, tenant, agent, [version.number])
            await tx.audit(caller, "DeleteVersion", version.name,
                           {"digest": record.digest, "bundles_removed": removed})
        log.info("deleted %s (%s) in tenant %s", version.name, record.digest, tenant)

    async def delete_endpoint(self, caller: Caller, endpoint: EndpointRef, *, etag: str = "") -> None:
        if endpoint.endpoint == DEFAULT_ENDPOINT:
            raise FailedPrecondition(
                f"{endpoint.name} always serves the newest version and goes only with its agent "
                f"(`corral agents delete {endpoint.agent} --force`)",
                reason="DEFAULT_ENDPOINT_READ_ONLY",
            )
        tenant = tenant_of(caller)
        async with self._store.tx() as tx:
            if not await tx.lock_agent(tenant, endpoint.parent):
                raise agent_missing(endpoint.parent)
            current = await tx.get_endpoint(tenant, endpoint, for_update=True)
            if current is None:
                raise NotFound(f"{endpoint.name} does not exist; `corral endpoint list "
                               f"{endpoint.agent}` lists them")
            check_etag(current, etag)
            run = await tx.active_run(tenant, endpoint)
            if run is not None:
                raise rules.runs_running(endpoint.name, [run])
            await tx.delete_endpoint(tenant, endpoint, current.revision)
            await tx.audit(caller, "DeleteEndpoint", endpoint.name, {
                "traffic": {str(s.version): s.percent for s in current.traffic},
                "revision": current.revision,
            })
        log.info("deleted %s in tenant %s", endpoint.name, tenant)

    # -- retention -------------------------------------------------------------------------

    async def retention_step(self) -> None:
        """One pass of the retention loop."""
        deleted = await self.apply_retention()
        if deleted:
            log.info("retention deleted %d versions unused for %d days", deleted, self.retention_days)

    async def apply_retention(self) -> int:
        """Deletes every tenant's versions unused for `retention_days` that nothing keeps (see
        lifecycle_rules.expired) and are not their agent's newest; returns how many. One agent's
        failure is logged and the others go on."""
        cutoff = rules.unused_since(self._clock.now(), self.retention_days)
        if cutoff is None:
            return 0
        deleted = 0
        candidates = await self._store.retention_candidates(cutoff)
        for (tenant, agent_id), group in groupby(
            candidates, key=lambda c: (c.version.tenant, c.version.agent)
        ):
            try:
                deleted += await self._retain(tenant, AgentRef(agent_id), list(group), cutoff)
            except CorralError as exc:
                log.warning("retention skipped agents/%s of tenant %s: %s", agent_id, tenant,
                            exc.message)
        return deleted

    async def _retain(
        self, tenant: str, agent: AgentRef, candidates: list[RetentionCandidate], cutoff: datetime
    ) -> int:
        refs = [c.version.ref for c in candidates]
        sessions = await self._sessions.pinned_sessions(tenant, refs)
        registry = acting_for(tenant)
        async with self._store.tx() as tx:
            if not await tx.lock_agent(tenant, agent):
                return 0
            # Another replica's retention may have deleted some meanwhile.
            left = set(await tx.version_states(tenant, agent, [c.version.number for c in candidates]))
            doomed = rules.expired(
                [c for c in candidates if c.version.number in left],
                await tx.watched_endpoints(tenant, agent),
                await tx.agent_runs(tenant, agent), sessions, cutoff,
            )
            if not doomed:
                return 0
            removed = await self._remove(tx, tenant, agent, [c.version.number for c in doomed])
            for c in doomed:
                await tx.audit(registry, "DeleteVersion", c.version.ref.name, {
                    "retention_days": self.retention_days, "last_used": c.last_used.isoformat(),
                    "digest": c.version.digest,
                    "bundles_removed": [d for d in removed if d == c.version.digest],
                })
        for c in doomed:
            log.info("retention deleted %s of tenant %s, unused since %s", c.version.ref.name,
                     tenant, c.last_used.isoformat())
        return len(doomed)

    # -- shared ----------------------------------------------------------------------------

    async def _remove(
        self, tx: LifecycleTx, tenant: str, agent: AgentRef, numbers: Sequence[int]
    ) -> list[str]:
        """Deletes the versions and then the bundles no version has any more; returns those."""
        if not numbers:
            return []
        digests = await tx.delete_versions(tenant, agent, numbers)
        return await tx.collect_bundles(digests)

    async def _active_sessions(self, tenant: str, versions: Sequence[VersionRef]) -> int:
        if not versions:
            return 0
        pins = await self._sessions.pinned_sessions(tenant, versions)
        return sum(p.active for p in pins.values())
