"""Warm pools: per version, sandboxes already started with the bundle imported, waiting for a
session. A new session takes one instead of paying the start; the pool refills in the background.

Which versions are warm, and why:
- "routed": an endpoint sends it traffic now (from the registry's endpoint watch);
- "rollback": an endpoint's previous stable version, so a rollback starts no sandbox;
- "active": a session of it started on this executor lately (sessions of a version come in runs).
A warm sandbox serves exactly one session and is never returned to a pool: nothing of one session
can reach the next. Warm sandboxes count against the executor's cap like any other: the pools
fill only from free slots, and a new session at the cap stops a warm one before an idle
session's (`evict_one`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from corral.names import VersionRef
from services.common.background import Backoff, Periodic, TaskSet
from services.common.endpoints import EndpointMirror, EndpointUpdate
from services.common.errors import CorralError
from services.common.settings import ExecutorSettings
from services.executor.admission import Slot
from services.executor.model import PoolReport, Registry
from services.executor.sandbox import Sandbox
from services.executor.starter import SandboxStarter

log = logging.getLogger(__name__)

REASONS = ("routed", "rollback", "active")  # in order of priority when the total cap binds
ACTIVE_FOR_S = 900.0  # a version stays warm this long after its last session started here
RETRY_AFTER_S = 30.0  # after a version's sandbox failed to start
# Besides whenever a session takes a sandbox or what is wanted changes: warm sandboxes can die,
# an active version can age out.
REFILL_EVERY_S = 5.0


@dataclass
class Want:
    digest: str
    reasons: set[str] = field(default_factory=set)


class WarmPools:
    """Sandboxes started ahead of their sessions by `starter`: warm_pool_size per wanted version,
    warm_pool_max_total in all (the executor's settings)."""

    def __init__(self, starter: SandboxStarter, settings: ExecutorSettings) -> None:
        self._starter = starter
        self.metrics = starter.metrics
        self.size = settings.warm_pool_size
        self.max_total = settings.warm_pool_max_total
        self._ready: dict[VersionRef, deque[Sandbox]] = {}
        # From the endpoint watch: version -> digest and reasons; replaced as a whole.
        self._endpoint_wants: dict[VersionRef, Want] = {}
        # version -> (digest, monotonic time of the last session start here).
        self._active: dict[VersionRef, tuple[str, float]] = {}
        self.hits: Counter[VersionRef] = Counter()
        self.misses: Counter[VersionRef] = Counter()
        self._failed_at: dict[VersionRef, float] = {}
        # The versions the pool gauges have series for.
        self._exported: set[VersionRef] = set()
        # Whether this executor keeps `version` warm for the fleet (membership.WarmShare); every
        # version when it is alone.
        self.keeps: Callable[[VersionRef], bool] = lambda version: True
        self._filler = Periodic(self._fill_once, every_s=REFILL_EVERY_S, what="warm pool refill")
        self._stopping = TaskSet("stopping a warm sandbox")

    # -- what is wanted -------------------------------------------------------------------

    def set_endpoint_wants(self, wants: Mapping[VersionRef, Want]) -> None:
        self._endpoint_wants = dict(wants)
        self._filler.wake()

    def wake(self) -> None:
        """Looks at what is wanted again now (the fleet changed)."""
        self._filler.wake()

    def wanted(self) -> dict[VersionRef, Want]:
        """Every version to keep warm, with its digest and why: the endpoints' versions this
        executor keeps for the fleet, and those active here."""
        now = time.monotonic()
        out = {
            v: Want(w.digest, set(w.reasons))
            for v, w in self._endpoint_wants.items() if self.keeps(v)
        }
        for version, (digest, at) in list(self._active.items()):
            if now - at > ACTIVE_FOR_S:
                del self._active[version]
                continue
            out.setdefault(version, Want(digest)).reasons.add("active")
        return out

    def _targets(self) -> dict[VersionRef, int]:
        """Sandboxes to keep per version: `size` each, by priority, within `max_total`."""
        if self.size <= 0:
            return {}
        wanted = self.wanted()
        order = sorted(wanted, key=lambda v: min(REASONS.index(r) for r in wanted[v].reasons))
        targets: dict[VersionRef, int] = {}
        left = self.max_total
        for version in order:
            n = min(self.size, left)
            if n <= 0:
                break
            targets[version] = n
            left -= n
        return targets

    # -- taking ---------------------------------------------------------------------------

    def take(self, version: VersionRef, digest: str) -> Sandbox | None:
        """A warm sandbox of `version` for a new session, or None. Either way the version
        counts as active here, so its pool fills for the next session. The caller says whether
        the session got a warm sandbox (`record`) once it has the session's lease, and gives one
        it could not use back (`give_back`)."""
        self._active[version] = (digest, time.monotonic())
        pool = self._ready.get(version)
        found: Sandbox | None = None
        while pool and found is None:
            sandbox = pool.popleft()
            if sandbox.alive and sandbox.digest == digest:
                found = sandbox
            else:
                self._discard(sandbox)
        self._filler.wake()
        return found

    def give_back(self, version: VersionRef, sandbox: Sandbox) -> None:
        """A sandbox `take` gave that served no session after all (the lease was refused)."""
        if sandbox.alive:
            self._ready.setdefault(version, deque()).appendleft(sandbox)
        else:
            self._discard(sandbox)

    def record(self, version: VersionRef, *, hit: bool) -> None:
        """A new session of `version` took a warm sandbox (a hit) or started one (a miss)."""
        counter, metric = (self.hits, self.metrics.pool_hits) if hit else (
            self.misses, self.metrics.pool_misses)
        counter[version] += 1
        metric.labels(*_labels(version)).inc()

    async def evict_one(self) -> bool:
        """Stops the warm sandbox that has waited longest, to free its slot for a session;
        False when there is none. Its pool refills once a slot is free again."""
        ready = self.ready()
        if not ready:
            return False
        oldest = min(ready, key=lambda sb: sb.started)
        for pool in self._ready.values():
            if oldest in pool:
                pool.remove(oldest)
        await oldest.stop()
        return True

    def warm_versions(self) -> list[str]:
        """The versions with a warm sandbox waiting."""
        return sorted(v.name for v, pool in self._ready.items() if pool)

    def ready(self) -> list[Sandbox]:
        """Every warm sandbox, waiting for a session."""
        return [sb for pool in self._ready.values() for sb in pool]

    def report(self) -> list[PoolReport]:
        """Every version with a pool or a count."""
        wanted = self.wanted()
        targets = self._targets()
        versions = set(wanted) | set(self._ready) | set(self.hits) | set(self.misses)
        return [
            PoolReport(
                version=v.name, ready=len(self._ready.get(v, ())), target=targets.get(v, 0),
                hits=self.hits[v], misses=self.misses[v],
                reasons=tuple(sorted(wanted[v].reasons, key=REASONS.index)) if v in wanted else (),
            )
            for v in sorted(versions, key=str)
        ]

    # -- the background filler ------------------------------------------------------------

    def start(self) -> None:
        self._filler.start()

    async def close(self) -> None:
        await self._filler.close()
        sandboxes = self.ready()
        self._ready.clear()
        await asyncio.gather(*(sb.stop() for sb in sandboxes), return_exceptions=True)
        await self._stopping.wait(timeout_s=10)

    async def _fill_once(self) -> None:
        targets = self._targets()
        wanted = self.wanted()
        # Shrink first: versions no longer wanted, dead sandboxes, pools over target.
        for version, pool in list(self._ready.items()):
            keep = targets.get(version, 0)
            for sandbox in [sb for sb in pool if not sb.alive]:
                pool.remove(sandbox)
                self._discard(sandbox)
            while len(pool) > keep:
                self._discard(pool.pop())
            if not pool:
                del self._ready[version]
        # Then grow, one sandbox at a time (starting many at once would slow the live sessions).
        now = time.monotonic()
        for version, target in targets.items():
            if now - self._failed_at.get(version, -RETRY_AFTER_S) < RETRY_AFTER_S:
                continue
            while len(self._ready.get(version, ())) < target and version in self._targets():
                slot = self._spare_slot()
                if slot is None:  # near the cap, or starts enough under way: sessions first
                    self._export()
                    return
                try:
                    sandbox = await self._starter.start(version, wanted[version].digest, slot)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - one version's failure must not stop others
                    self._failed_at[version] = time.monotonic()
                    log.warning("could not start a warm sandbox for %s: %s", version, exc)
                    break
                if version not in self._targets():  # no longer wanted while it started
                    self._discard(sandbox)
                    break
                self._ready.setdefault(version, deque()).append(sandbox)
        self._export()

    def _spare_slot(self) -> Slot | None:
        """A slot to start a warm sandbox in, only while sessions have room beside it: more than
        an eighth of the cap free, and a start to spare."""
        slots = self._starter.slots
        if slots.free <= max(1, slots.cap // 8) or slots.starting >= max(1, slots.max_starting - 1):
            return None
        slot = slots.try_take()
        if slot is not None:
            slot.start_begins()
        return slot

    def _export(self) -> None:
        targets = self._targets()
        versions = set(targets) | set(self._ready)
        for gone in self._exported - versions:  # no series left behind for a forgotten version
            self.metrics.pool_ready.remove(*_labels(gone))
            self.metrics.pool_target.remove(*_labels(gone))
        for version in versions:
            self.metrics.pool_ready.labels(*_labels(version)).set(len(self._ready.get(version, ())))
            self.metrics.pool_target.labels(*_labels(version)).set(targets.get(version, 0))
        self._exported = versions

    def _discard(self, sandbox: Sandbox) -> None:
        self._stopping.spawn(sandbox.stop())


def _labels(version: VersionRef) -> tuple[str, str]:
    """A pool's labels: agent and version, as services/common/prometheus.py names them."""
    return version.agent, str(version.number or version.digest)


class EndpointWants:
    """Tells the pools which versions the endpoints want warm: those an endpoint routes to, and
    each endpoint's rollback version. Runs whenever the executor's endpoint mirror changes. The
    same watch says which versions were deleted, which bundles collected and which tools changed:
    `on_invalidated` hears of them (with or without pools)."""

    def __init__(
        self, registry: Registry, pools: WarmPools | None,
        on_invalidated: Callable[[EndpointUpdate], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self.pools = pools
        self.mirror = EndpointMirror(
            registry.endpoints(), on_change=self._publish, on_invalidated=on_invalidated,
            backoff=Backoff(0.5, 10.0),
        )
        # Versions are immutable: cached for good, per tenant (names are per tenant).
        self._digests: dict[tuple[str, VersionRef], str] = {}

    def start(self) -> None:
        self.mirror.start()

    async def close(self) -> None:
        await self.mirror.close()

    async def _publish(self) -> None:
        if self.pools is None:
            return
        reasons: dict[tuple[str, VersionRef], set[str]] = {}
        for ep in self.mirror.all():
            for routed in ep.versions():
                reasons.setdefault((ep.tenant, routed), set()).add("routed")
            if ep.rollback_version:
                rollback = ep.ref.parent.version(ep.rollback_version)
                reasons.setdefault((ep.tenant, rollback), set()).add("rollback")
        wants: dict[VersionRef, Want] = {}
        for (tenant, version), why in reasons.items():
            digest = await self._digest(tenant, version)
            if digest:
                wants[version] = Want(digest, why)
        self.pools.set_endpoint_wants(wants)

    async def _digest(self, tenant: str, version: VersionRef) -> str:
        digest = self._digests.get((tenant, version))
        if digest is None:
            try:
                digest = self._digests[(tenant, version)] = await self.registry.digest(tenant, version)
            except CorralError as exc:
                log.warning("cannot keep %s warm: %s", version, exc.message)
                return ""
        return digest
