"""The registry's domain: publishing immutable versions, endpoints and their traffic, the watch on
endpoint changes, the audit log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

from corral.names import AgentRef, EndpointRef, ToolRef, VersionRef
from services.common.endpoints import TrafficShare
from services.common.errors import (
    Aborted,
    AlreadyExists,
    InvalidArgument,
    NotFound,
)
from services.common.identity import Caller
from services.common.paging import Page
from services.registry import rules
from services.registry.endpoint_feed import EndpointFeed
from services.registry.model import (
    AgentRecord,
    AuditRecord,
    EndpointChange,
    EndpointRecord,
    Paging,
    RegistryStore,
    VersionRecord,
    WatchEvent,
    read_page,
)
from services.registry.publishing import OnChecking, Publishing, check_routable
from services.registry.rollouts import Rollouts
from services.registry.tenancy import bundle_tenant, tenant_of, visible_tenant


def agent_missing(agent: AgentRef) -> NotFound:
    return NotFound(f"{agent.name} does not exist; publish a bundle to create it")


def check_etag(current: EndpointRecord, etag: str) -> None:
    """ABORTED when the caller read the endpoint at an etag that is no longer current."""
    if etag and etag != current.etag:
        raise Aborted(
            f"{current.ref.name} changed since it was read (etag {etag}, now {current.etag}); "
            "read it again and retry",
            reason="ETAG_MISMATCH",
        )


class Registry:
    def __init__(
        self, store: RegistryStore, rollouts: Rollouts, publishing: Publishing | None = None
    ) -> None:
        self._store = store
        self._rollouts = rollouts
        self._publishing = publishing or Publishing(store)
        self._feed = EndpointFeed(store)

    # -- agents ----------------------------------------------------------------------------

    async def create_agent(self, caller: Caller, agent: AgentRef) -> AgentRecord:
        tenant = tenant_of(caller)
        async with self._store.tx() as tx:
            if not await tx.ensure_agent(tenant, agent, caller.user):
                raise AlreadyExists(f"{agent.name} already exists")
            await tx.audit(caller, "CreateAgent", agent.name, {})
        return await self.get_agent(caller, agent)

    async def get_agent(self, caller: Caller, agent: AgentRef) -> AgentRecord:
        record = await self._store.get_agent(tenant_of(caller), agent)
        if record is None:
            raise agent_missing(agent)
        return record

    async def list_agents(self, paging: Paging) -> Page[AgentRecord]:
        rows = partial(self._store.list_agents, tenant_of(paging.who))
        return await read_page(paging, "ListAgents", None, (str,), rows, key=lambda a: (a.id,))

    # -- versions --------------------------------------------------------------------------

    async def publish(
        self, caller: Caller, parent: AgentRef | None, data: bytes, expected_digest: str,
        request_id: str, on_checking: OnChecking | None = None,
    ) -> tuple[VersionRecord, bool]:
        """See Publishing.publish."""
        return await self._publishing.publish(
            caller, parent, data, expected_digest, request_id, on_checking)

    async def get_version(self, caller: Caller, version: VersionRef) -> VersionRecord:
        return await self._version(tenant_of(caller), version)

    async def _version(self, tenant: str, version: VersionRef) -> VersionRecord:
        record = await self._store.get_version(tenant, version)
        if record is None:
            raise NotFound(f"{version.name} does not exist; `corral versions {version.agent}` lists them")
        return record

    async def list_versions(self, agent: AgentRef, paging: Paging) -> Page[VersionRecord]:
        await self.get_agent(paging.who, agent)
        rows = partial(self._store.list_versions, tenant_of(paging.who), agent)
        return await read_page(paging, "ListVersions", agent, (int,), rows, key=lambda v: (v.number,))

    async def _downloadable(self, caller: Caller, version: VersionRef) -> VersionRecord:
        """The version whose bundle `caller` may have: one of its tenant, or, for an executor
        acting for every tenant, one of any tenant with the digest it names."""
        tenant = bundle_tenant(caller)
        if tenant is not None:
            return await self._version(tenant, version)
        if not version.digest:
            raise InvalidArgument.field(
                "name", f"{version.name}: acting for every tenant, name the version by its digest "
                "(agents/{agent}/versions/sha256:…)")
        found = await self._store.version_with_digest(version)
        if found is None:
            raise NotFound(f"no tenant has {version.name}")
        return found

    async def download(self, caller: Caller, version: VersionRef) -> tuple[VersionRecord, bytes]:
        record = await self._downloadable(caller, version)
        data = await self._store.bundle(record.digest)
        if data is None:
            raise NotFound(f"the bundle of {version.name} ({record.digest}) is missing from the store")
        return record, data

    # -- endpoints -------------------------------------------------------------------------

    async def get_endpoint(self, caller: Caller, endpoint: EndpointRef) -> EndpointRecord:
        tenant = tenant_of(caller)
        record = await self._store.get_endpoint(tenant, endpoint)
        if record is None:
            if await self._store.get_agent(tenant, endpoint.parent) is None:
                raise agent_missing(endpoint.parent)
            raise NotFound(
                f"{endpoint.name} does not exist; create it with "
                f"`corral endpoint set {endpoint.agent} {endpoint.endpoint} --version N`"
            )
        return record

    async def list_endpoints(self, agent: AgentRef | None, paging: Paging) -> Page[EndpointRecord]:
        if agent is not None:
            await self.get_agent(paging.who, agent)
        rows = partial(self._store.list_endpoints, tenant_of(paging.who), agent)
        return await read_page(paging, "ListEndpoints", agent, (str, str), rows,
                               key=lambda e: (e.agent, e.id))

    async def set_endpoint(
        self,
        caller: Caller,
        endpoint: EndpointRef,
        change: EndpointChange,
        *,
        etag: str = "",
        allow_missing: bool = False,
        must_create: bool = False,
        method: str = "UpdateEndpoint",
    ) -> EndpointRecord:
        """Replaces what `change` sets. A change of traffic during a rollout aborts the rollout."""
        split = None
        if change.traffic is not None:
            split = rules.version_numbers(endpoint.agent, change.traffic)
        rules.check_settable(endpoint)
        traffic = rules.normalize_split(split) if split is not None else None
        tenant = tenant_of(caller)
        async with self._store.tx() as tx:
            if not await tx.lock_agent(tenant, endpoint.parent):
                raise agent_missing(endpoint.parent)
            if traffic is not None:
                await check_routable(tx, tenant, endpoint.parent, [s.version for s in traffic])
            current = await tx.get_endpoint(tenant, endpoint, for_update=True)
            if current is None and not allow_missing:
                raise NotFound(f"{endpoint.name} does not exist (set allow_missing to create it)")
            if current is not None and must_create:
                raise AlreadyExists(f"{endpoint.name} already exists")
            if current is not None:
                check_etag(current, etag)
            if traffic is None:
                if current is None:
                    raise InvalidArgument.field(
                        "update_mask", f"{endpoint.name} does not exist yet: creating it needs traffic"
                    )
                traffic = current.traffic
            description = change.description
            if description is None:
                description = current.description if current is not None else ""
            aborted = None
            if current is not None and change.traffic is not None:
                aborted = await self._rollouts.abort_for_manual_change(tx, endpoint, caller, traffic)
            record = await tx.put_endpoint(tenant, endpoint, traffic, description=description)
            await tx.audit(
                caller, method, endpoint.name,
                {
                    "before": _split_dict(current.traffic) if current else None,
                    "after": _split_dict(traffic),
                    "revision": record.revision,
                },
            )
        if aborted is not None:
            self._rollouts.announce(aborted)
        return record

    # -- watch -----------------------------------------------------------------------------

    async def start_watching(self) -> None:
        await self._feed.start()

    async def stop_watching(self) -> None:
        await self._feed.stop()

    async def watch(self, caller: Caller, agent: AgentRef | None) -> AsyncIterator[WatchEvent]:
        """Yields every endpoint the caller sees (a snapshot) once, then each change: the
        caller's tenant's, or every tenant's for a service acting for all, which also hears of
        the bundles collected."""
        tenant = visible_tenant(caller)
        if agent is not None:
            await self.get_agent(caller, agent)
        # Subscribe before the snapshot, so a change between the two is not lost.
        async with self._feed.subscription() as changes:
            yield WatchEvent(tuple(await self._store.watched_endpoints(tenant, agent)), snapshot=True)
            while True:
                change = await changes.next()
                if change is None:
                    return
                if isinstance(change, str):
                    if tenant is None:
                        yield WatchEvent(removed_bundles=(change,))
                    continue
                changed_tenant, ref = change
                if tenant is not None and changed_tenant != tenant:
                    continue
                if isinstance(ref, ToolRef):
                    yield WatchEvent(changed_tools=((changed_tenant, ref),))
                    continue
                if agent is not None and ref.agent != agent.agent:
                    continue
                if isinstance(ref, VersionRef):
                    yield WatchEvent(removed_versions=((changed_tenant, ref),))
                    continue
                record = await self._store.get_endpoint(changed_tenant, ref)
                if record is not None:
                    yield WatchEvent((record,))
                else:
                    yield WatchEvent(removed=((changed_tenant, ref),))

    # -- audit -----------------------------------------------------------------------------

    async def list_audit(self, prefix: str, paging: Paging) -> Page[AuditRecord]:
        rows = partial(self._store.list_audit, tenant_of(paging.who), prefix)
        return await read_page(paging, "ListAuditEvents", prefix, (int,), rows, key=lambda e: (e.id,))


def _split_dict(traffic: tuple[TrafficShare, ...]) -> dict[str, float]:
    return {str(s.version): s.percent for s in traffic}
