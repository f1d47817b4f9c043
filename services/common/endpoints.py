"""Endpoints as routers and executors see them: the traffic of each, mirrored from the registry's
watch stream (a snapshot, then every change), opened again with backoff whenever it breaks.
Routers resolve sessions from the mirror; executors choose from it the versions to keep warm.
Endpoint names are per tenant: the mirror holds every tenant's, keyed by (tenant, name)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from corral.names import EndpointRef, ToolRef, VersionRef
from services.common.auth.principal import DEFAULT_TENANT
from services.common.background import Backoff, TaskSet
from services.common.errors import CorralError

log = logging.getLogger(__name__)
# A router must see endpoint changes again quickly after the registry comes back.
RECONNECT = Backoff(first_s=0.1, max_s=5.0)
BASIS_POINTS = 10_000
# An endpoint among every tenant's: its tenant and its name.
EndpointKey = tuple[str, EndpointRef]
# A version among every tenant's: its tenant and its name.
VersionKey = tuple[str, VersionRef]
# A tool among every tenant's: its tenant and its name.
ToolKey = tuple[str, ToolRef]


@dataclass(frozen=True)
class TrafficShare:
    version: int
    basis_points: int

    @property
    def percent(self) -> float:
        return self.basis_points / 100


@dataclass(frozen=True)
class EndpointTraffic:
    ref: EndpointRef
    salt: str
    revision: int
    shares: tuple[TrafficShare, ...]
    # The version a rollback would return to (0: none).
    rollback_version: int = 0
    tenant: str = DEFAULT_TENANT

    @property
    def key(self) -> EndpointKey:
        return (self.tenant, self.ref)

    def routes_to(self, version: int) -> bool:
        return any(s.version == version and s.basis_points > 0 for s in self.shares)

    def versions(self) -> Iterable[VersionRef]:
        return (VersionRef(self.ref.agent, s.version) for s in self.shares if s.basis_points > 0)


@dataclass(frozen=True)
class EndpointUpdate:
    """One message of the watch: every endpoint (snapshot) or the ones that changed, the
    endpoints and versions deleted, and the digests whose bundles no version has any more."""

    endpoints: tuple[EndpointTraffic, ...]
    snapshot: bool
    removed: tuple[EndpointKey, ...] = ()
    removed_versions: tuple[VersionKey, ...] = ()
    removed_bundles: tuple[str, ...] = ()
    # Tools changed or deleted: what was cached of them is stale.
    changed_tools: tuple[ToolKey, ...] = ()

    @property
    def invalidates(self) -> bool:
        """Whether a cache of versions, bundles or tools has something to forget: a snapshot
        (the watch was re-established, and what changed meanwhile is not known) or a change."""
        return self.snapshot or bool(
            self.removed_versions or self.removed_bundles or self.changed_tools)


class EndpointSource(Protocol):
    """The registry, as a mirror reads it."""

    def watch(self) -> AsyncIterator[EndpointUpdate]:
        """The watch stream; it ends or raises a CorralError when the connection is lost."""
        ...

    async def get(self, tenant: str, ref: EndpointRef) -> EndpointTraffic:
        """The tenant's endpoint, read as the service acting in that tenant."""
        ...


class EndpointMirror:
    """The newest revision of every endpoint, kept by following the watch until closed."""

    def __init__(
        self,
        source: EndpointSource,
        *,
        on_change: Callable[[], Awaitable[None]] | None = None,
        on_invalidated: Callable[[EndpointUpdate], Awaitable[None]] | None = None,
        backoff: Backoff = RECONNECT,
    ) -> None:
        self._source = source
        self._on_change = on_change
        # Hears of deleted versions, collected bundles and changed tools, to drop what is cached
        # of them; and of every snapshot, after which nothing cached can be trusted to be current.
        self._on_invalidated = on_invalidated
        self._backoff = backoff
        self._endpoints: dict[EndpointKey, EndpointTraffic] = {}
        self._tasks = TaskSet("endpoint watch")
        self.synced = asyncio.Event()
        # When each revision was applied (monotonic seconds), for propagation measurements.
        self.applied_at: dict[tuple[EndpointKey, int], float] = {}

    def start(self) -> None:
        self._tasks.spawn(self._follow_forever())

    async def close(self) -> None:
        await self._tasks.close()

    def cached(self, tenant: str, ref: EndpointRef) -> EndpointTraffic | None:
        return self._endpoints.get((tenant, ref))

    def all(self) -> list[EndpointTraffic]:
        return list(self._endpoints.values())

    async def get(self, tenant: str, ref: EndpointRef) -> EndpointTraffic:
        """The tenant's mirrored endpoint; on a miss (one created a moment ago, or the watch
        still connecting) it is read from the registry."""
        found = self._endpoints.get((tenant, ref))
        if found is not None:
            return found
        return self.apply(await self._source.get(tenant, ref))

    def apply(self, endpoint: EndpointTraffic) -> EndpointTraffic:
        """Keeps `endpoint` unless a newer revision is mirrored already; returns the kept one."""
        current = self._endpoints.get(endpoint.key)
        if current is not None and endpoint.revision < current.revision:
            return current
        self._endpoints[endpoint.key] = endpoint
        if len(self.applied_at) > 10_000:
            self.applied_at.clear()
        self.applied_at[(endpoint.key, endpoint.revision)] = time.monotonic()
        return endpoint

    async def _follow_forever(self) -> None:
        backoff = self._backoff.first_s
        while True:
            try:
                async for update in self._source.watch():
                    await self._take(update)
                    if update.snapshot:
                        backoff = self._backoff.first_s
                log.warning("endpoint watch ended; reconnecting in %.1fs", backoff)
            except asyncio.CancelledError:
                raise
            except CorralError as exc:
                log.warning("endpoint watch lost (%s); reconnecting in %.1fs", exc.message, backoff)
            except Exception:
                log.exception("endpoint watch failed; reconnecting in %.1fs", backoff)
            self.synced.clear()
            await asyncio.sleep(backoff)
            backoff = self._backoff.after(backoff)

    async def _take(self, update: EndpointUpdate) -> None:
        if update.snapshot:
            seen = {self.apply(e).key for e in update.endpoints}
            for key in set(self._endpoints) - seen:
                del self._endpoints[key]
        else:
            for endpoint in update.endpoints:
                self.apply(endpoint)
            for key in update.removed:
                self._endpoints.pop(key, None)
        if update.invalidates and self._on_invalidated is not None:
            await self._on_invalidated(update)
        if self._on_change is not None:
            await self._on_change()
        if update.snapshot:
            self.synced.set()
