"""The executor's domain: a sandbox per session that lives across turns (sandboxes.py), warm
pools per version (pools.py), one turn per invocation (turn.py), per-invocation credentials
(credentials.py); what the servicer calls."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from datetime import datetime

from opentelemetry.context import Context as OtelContext

from corral.names import SessionRef, VersionRef
from services.common import tenancy
from services.common.background import Periodic
from services.common.endpoints import EndpointUpdate
from services.common.errors import CorralError, InvalidArgument
from services.common.identity import Caller
from services.common.paging import MAX_PAGE_SIZE, PageQuery
from services.common.prometheus import Series
from services.common.settings import ExecutorSettings
from services.executor.admission import REFUSALS
from services.executor.broker import ModelBroker
from services.executor.checks import StartChecks
from services.executor.credentials import CredentialIssuer, InvocationCredentials
from services.executor.model import (
    Event,
    Invocation,
    LogExport,
    SandboxInfo,
    SandboxListing,
    Sessions,
    SpanExport,
    StartCheckResult,
)
from services.executor.pools import WarmPools
from services.executor.sandboxes import SandboxKey, SandboxTable
from services.executor.starter import SandboxStarter
from services.executor.tools import ToolBroker
from services.executor.turn import Turns

# One executor's sandboxes are few (max_live_sandboxes, 64 by default, and the warm pools, at
# most warm_pool_max_total): a caller that does not page sees all of them, as before
# ListSandboxes paged.
SANDBOXES_PAGE_SIZE = MAX_PAGE_SIZE
# How often the unpacked copies of collected bundles still run by a sandbox are looked at again.
BUNDLE_SWEEP_S = 30.0


def _listing_order(info: SandboxInfo) -> tuple[datetime, str]:
    return info.start_time, info.id


class Executor:
    def __init__(
        self, settings: ExecutorSettings, starter: SandboxStarter, sessions: Sessions,
        spans: SpanExport, broker: ModelBroker, holder: str, *,
        credentials: CredentialIssuer | None = None, tools: ToolBroker | None = None,
        logs: LogExport | None = None,
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        self.tools = tools
        self._starter = starter
        metrics = starter.metrics
        self.pools = WarmPools(starter, settings) if settings.warm_pool_size > 0 else None
        self.sandboxes = SandboxTable(
            settings, sessions, starter.bundles, starter, self.pools, metrics, holder
        )
        self._credentials = InvocationCredentials(credentials)
        self._turns = Turns(
            self.sandboxes, sessions, spans, broker, tools, self._credentials, metrics, logs
        )
        self._bundle_sweeper = Periodic(
            self._sweep_bundles, every_s=BUNDLE_SWEEP_S, what="collected bundles sweep")
        self._checks = StartChecks(starter, settings.start_check_timeout_s, self.sandboxes.admit)
        self._metrics = metrics

    def start(self) -> None:
        self._starter.remove_leftovers()
        self.sandboxes.start()
        self._bundle_sweeper.start()
        if self.pools is not None:
            self.pools.start()

    async def close(self) -> None:
        await self._bundle_sweeper.close()
        if self.pools is not None:
            await self.pools.close()
        await self.sandboxes.close()
        await self._credentials.close()

    async def execute(
        self, caller: Caller, inv: Invocation, parent: OtelContext
    ) -> AsyncGenerator[Event, None]:
        if len(inv.payload) > self.settings.max_payload_bytes:
            raise InvalidArgument.field(
                "payload",
                f"{len(inv.payload)} bytes is over the {self.settings.max_payload_bytes}-byte limit",
            )
        try:
            # aclosing: closing this generator must close the turn's too, so that its clean-up
            # (stopping a worker that is mid-turn) runs before the session is free again.
            async with (
                self.sandboxes.claim(SandboxKey.of(caller, inv.session), inv.request_id),
                contextlib.aclosing(self._turns.run(caller, inv, parent)) as events,
            ):
                async for event in events:
                    yield event
        except CorralError as exc:
            if exc.reason in REFUSALS and not exc.domain:
                series = Series.of(caller.tenant, inv.version, inv.endpoint)
                self._metrics.refusals.labels(*series.labels, exc.reason).inc()
            raise

    async def stop_session(self, caller: Caller, session: SessionRef) -> bool:
        """Ends the session's sandbox in the caller's tenant (a service acting for every tenant
        ends the session's in every tenant)."""
        return await self.sandboxes.stop(tenancy.tenant_scope(caller), session)

    async def forget_stale(self, update: EndpointUpdate) -> None:
        """Forgets the pins of deleted versions (a session pinned to one is refused from then
        on) and what is cached of changed tools (all of them after a snapshot: changes made
        while the watch was away are not known), and deletes the unpacked copies of bundles no
        version has any more; one a sandbox here still runs (a session of a version deleted
        meanwhile) goes at a later sweep, once it stopped."""
        if self.tools is not None:
            if update.snapshot:
                self.tools.forget_all()
            else:
                self.tools.forget(update.changed_tools)
        self._starter.bundles.forget_versions(update.removed_versions)
        self._starter.bundles.collected(update.removed_bundles)
        await self._sweep_bundles()

    async def _sweep_bundles(self) -> None:
        await self._starter.bundles.sweep(self.sandboxes.running_digests())

    async def check_version(self, version: VersionRef, digest: str) -> StartCheckResult:
        """Starts `version` once in a sandbox of its own and stops it (the start check at
        publish); the registry alone may ask, for a version it has just stored."""
        return await self._checks.check(version, digest)

    def list_sandboxes(self, caller: Caller, page_size: int, page_token: str) -> SandboxListing:
        """The sandboxes here of the caller's tenant's sessions (of every tenant's for a service
        acting for all), oldest first, and the warm ones; the warm pools with the first page."""
        tenant = tenancy.readable_tenant(caller, "sandboxes")
        query = PageQuery.start(
            "ListSandboxes", owner=tenant or "", where=None, page_size=page_size,
            token=page_token, key_shape=(datetime, str), default_size=SANDBOXES_PAGE_SIZE,
        )
        after = query.after
        rows = sorted(self.sandboxes.listing(tenant), key=_listing_order)
        if after is not None:
            rows = [r for r in rows if _listing_order(r) > after]
        page = query.page(rows[: query.fetch_limit], key=_listing_order)
        pools = self.pools.report() if self.pools is not None and after is None else []
        return SandboxListing(page.items, pools, page.next_page_token)

    def in_use(self) -> int:
        """Sandboxes bound to sessions now (what the fleet balances on)."""
        return self.sandboxes.in_use()

    def warm_versions(self) -> list[str]:
        return self.pools.warm_versions() if self.pools is not None else []

    async def jwks(self) -> dict[str, list[dict[str, str]]]:
        return await self.credentials.jwks() if self.credentials is not None else {"keys": []}

    async def is_revoked(self, jti: str) -> bool:
        return await self.credentials.is_revoked(jti) if self.credentials is not None else False

