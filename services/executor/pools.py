"""Warm pools: per version, sandboxes already started with the bundle imported, waiting for a
session. A new session takes one instead of paying the start; the pool refills in the background.

Which versions are warm, and why:
- "routed": an endpoint sends it traffic now (from the registry's endpoint watch);
- "rollback": an endpoint's previous stable version, so a rollback starts no sandbox;
- "active": a session of it started on this executor lately (sessions of a version come in runs).
A warm sandbox serves exactly one session and is never returned to a pool: nothing of one session
can reach the next."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import grpc

from corral.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.endpoint_watch import RegistryEndpoints
from services.common.endpoints import EndpointMirror
from services.executor.metrics import ExecutorMetrics
from services.executor.sandbox import Sandbox

log = logging.getLogger(__name__)

REASONS = ("routed", "rollback", "active")  # in order of priority when the total cap binds
ACTIVE_FOR_S = 900.0  # a version stays warm this long after its last session started here
RETRY_AFTER_S = 30.0  # after a version's sandbox failed to start


@dataclass
class Want:
    digest: str
    reasons: set[str] = field(default_factory=set)


StartSandbox = Callable[[str, str], Awaitable[Sandbox]]


class WarmPools:
    def __init__(
        self, start: StartSandbox, size: int, max_total: int, metrics: ExecutorMetrics
    ) -> None:
        # start(version, digest) -> a started sandbox bound to no session.
        self._start = start
        self.size = size
        self.max_total = max_total
        self.metrics = metrics
        self._ready: dict[str, deque[Sandbox]] = {}
        # From the endpoint watch: version -> digest and reasons; replaced as a whole.
        self._endpoint_wants: dict[str, Want] = {}
        # version -> (digest, monotonic time of the last session start here).
        self._active: dict[str, tuple[str, float]] = {}
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self._failed_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()

    # -- what is wanted -------------------------------------------------------------------

    def set_endpoint_wants(self, wants: Mapping[str, Want]) -> None:
        self._endpoint_wants = dict(wants)
        self._wake.set()

    def wanted(self) -> dict[str, Want]:
        """Every version to keep warm, with its digest and why."""
        now = time.monotonic()
        out = {v: Want(w.digest, set(w.reasons)) for v, w in self._endpoint_wants.items()}
        for version, (digest, at) in list(self._active.items()):
            if now - at > ACTIVE_FOR_S:
                del self._active[version]
                continue
            out.setdefault(version, Want(digest)).reasons.add("active")
        return out

    def _targets(self) -> dict[str, int]:
        """Sandboxes to keep per version: `size` each, by priority, within `max_total`."""
        if self.size <= 0:
            return {}
        wanted = self.wanted()
        order = sorted(wanted, key=lambda v: min(REASONS.index(r) for r in wanted[v].reasons))
        targets: dict[str, int] = {}
        left = self.max_total
        for version in order:
            n = min(self.size, left)
            if n <= 0:
                break
            targets[version] = n
            left -= n
        return targets

    # -- taking ---------------------------------------------------------------------------

    def take(self, version: str, digest: str) -> Sandbox | None:
        """A warm sandbox of `version` for a new session, or None (a miss). Either way the
        version counts as active here, so its pool fills for the next session."""
        self._active[version] = (digest, time.monotonic())
        pool = self._ready.get(version)
        while pool:
            sandbox = pool.popleft()
            if sandbox.alive and sandbox.spec.bundle_dir.name.endswith(digest.split(":", 1)[-1]):
                self.hits[version] += 1
                self.metrics.pool_hits.labels(version).inc()
                self._wake.set()
                return sandbox
            self._discard(sandbox)
        self.misses[version] += 1
        self.metrics.pool_misses.labels(version).inc()
        self._wake.set()
        return None

    def ready(self) -> dict[str, list[Sandbox]]:
        return {v: list(p) for v, p in self._ready.items() if p}

    def report(self) -> list[tuple[str, int, int, int, int, list[str]]]:
        """(version, ready, target, hits, misses, reasons) for every version with a pool or a count."""
        wanted = self.wanted()
        targets = self._targets()
        versions = set(wanted) | set(self._ready) | set(self.hits) | set(self.misses)
        return [
            (v, len(self._ready.get(v, ())), targets.get(v, 0), self.hits[v], self.misses[v],
             sorted(wanted[v].reasons, key=REASONS.index) if v in wanted else [])
            for v in sorted(versions)
        ]

    # -- the background filler ------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._fill_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        sandboxes = [sb for pool in self._ready.values() for sb in pool]
        self._ready.clear()
        await asyncio.gather(*(sb.stop() for sb in sandboxes), *self._stopping, return_exceptions=True)

    async def _fill_forever(self) -> None:
        while True:
            try:
                await self._fill_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("warm pool refill failed; retrying")
            self._wake.clear()
            # Woken by a take or a change of what is wanted; otherwise look again now and then
            # (warm sandboxes can die, an active version can age out).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._wake.wait()

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
                try:
                    sandbox = await self._start(version, wanted[version].digest)
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

    def _export(self) -> None:
        for version, ready, *_ in self.report():
            self.metrics.pool_ready.labels(version).set(ready)

    def _discard(self, sandbox: Sandbox) -> None:
        task = asyncio.get_running_loop().create_task(sandbox.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)


class EndpointWants:
    """Tells the pools which versions the endpoints want warm: those an endpoint routes to, and
    each endpoint's rollback version. Runs whenever the executor's endpoint mirror changes."""

    def __init__(self, registry: registry_pb2_grpc.RegistryServiceAsyncStub, pools: WarmPools) -> None:
        self.registry = registry
        self.pools = pools
        self.mirror = EndpointMirror(
            RegistryEndpoints(registry), on_change=self._publish, first_backoff_s=0.5,
            max_backoff_s=10.0,
        )
        self._digests: dict[str, str] = {}  # versions are immutable: cached for good

    def start(self) -> None:
        self.mirror.start()

    async def close(self) -> None:
        await self.mirror.close()

    async def _publish(self) -> None:
        reasons: dict[str, set[str]] = {}
        for ep in self.mirror.all():
            for version in ep.versions():
                reasons.setdefault(version.name, set()).add("routed")
            if ep.rollback_version:
                rollback = ep.ref.parent.version(ep.rollback_version).name
                reasons.setdefault(rollback, set()).add("rollback")
        wants: dict[str, Want] = {}
        for version, why in reasons.items():
            digest = await self._digest(version)
            if digest:
                wants[version] = Want(digest, why)
        self.pools.set_endpoint_wants(wants)

    async def _digest(self, version: str) -> str:
        digest = self._digests.get(version)
        if digest is None:
            try:
                found = await self.registry.GetVersion(registry_pb2.GetVersionRequest(name=version))
            except grpc.aio.AioRpcError as exc:
                log.warning("cannot keep %s warm: %s", version, exc.details())
                return ""
            digest = self._digests[version] = found.digest
        return digest
