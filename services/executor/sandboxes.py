"""The sandbox table: which session has which sandbox, under which lease, and which are busy.
A sandbox lives across its session's turns; a background reaper stops the idle, the expired and
the exited ones, and another loop renews the leases of the rest. A new session's sandbox is
admitted under the executor's cap (admission.py): a free slot, else one freed by stopping a warm
sandbox or the least recently used session sandbox idle for `evict_idle_s`, else a refusal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

from corral.manifest import Manifest
from corral.names import SessionRef, VersionRef
from services.common.background import Periodic
from services.common.errors import Aborted
from services.common.identity import Caller
from services.common.requests import REASON_REQUEST_IN_PROGRESS
from services.common.settings import ExecutorSettings
from services.executor.admission import SessionQueues, Slot
from services.executor.bundles import BundleCache
from services.executor.metrics import ExecutorMetrics
from services.executor.model import Invocation, SandboxInfo, SandboxState, Sessions, SessionState
from services.executor.pools import WarmPools
from services.executor.sandbox import Sandbox
from services.executor.starter import SandboxStarter

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 5.0
# How long a new session waits for sandboxes being stopped to give their slots back.
STOPPING_WAIT_S = 1.0


@dataclass(frozen=True)
class SandboxKey:
    """Which session a sandbox serves: the same session id in two tenants is two sessions, and
    never shares a sandbox."""

    tenant: str
    session: SessionRef

    @classmethod
    def of(cls, caller: Caller, session: SessionRef) -> SandboxKey:
        return cls(caller.tenant, session)

    def __str__(self) -> str:
        return f"{self.session} of tenant {self.tenant!r}"


@dataclass(eq=False)
class SessionSandbox:
    """A sandbox bound to a session, and what the executor keeps for the session between turns:
    its lease and the state it last committed."""

    key: SandboxKey
    sandbox: Sandbox
    manifest: Manifest
    owner: Caller
    lease_id: str
    committed: SessionState
    # Set when the session was stopped on purpose, so a running invocation can say so.
    stopped: bool = False

    @property
    def session(self) -> SessionRef:
        return self.key.session


class SandboxTable:
    def __init__(
        self, settings: ExecutorSettings, sessions: Sessions, bundles: BundleCache,
        starter: SandboxStarter, pools: WarmPools | None, metrics: ExecutorMetrics, holder: str,
    ) -> None:
        self._settings, self._metrics = settings, metrics
        # Leases are taken in the name of `holder` (this executor).
        self._sessions, self._holder = sessions, holder
        # A new session's sandbox: from a warm pool, else started from its bundle.
        self._bundles, self._starter, self._pools = bundles, starter, pools
        self._bound: dict[SandboxKey, SessionSandbox] = {}
        self._busy: set[SandboxKey] = set()
        # The request id of the invocation holding each busy session, when it has one.
        self._requests: dict[SandboxKey, str] = {}
        self._slots = starter.slots
        self._queues = SessionQueues(settings.session_queue, settings.session_queue_wait_s)
        self._reaper = Periodic(
            self._reap, every_s=REAP_INTERVAL_S, first_delay_s=REAP_INTERVAL_S, what="sandbox reaper"
        )
        # Three renewals per lease lifetime, but never a busy loop on a tiny (misconfigured) one.
        renew_every_s = max(settings.lease_ttl_s / 3, 1.0)
        self._renewal = Periodic(
            self._renew, every_s=renew_every_s, first_delay_s=renew_every_s, what="lease renewal"
        )

    def start(self) -> None:
        self._reaper.start()
        self._renewal.start()

    async def close(self) -> None:
        await self._reaper.close()
        await self._renewal.close()
        await asyncio.gather(
            *(self.stop(k.tenant, k.session) for k in list(self._bound)), return_exceptions=True
        )

    @contextlib.asynccontextmanager
    async def claim(self, key: SandboxKey, request_id: str = "") -> AsyncIterator[None]:
        """Holds the session for one invocation, after the ones before it (a bounded queue:
        SESSION_QUEUE_FULL beyond it, SESSION_BUSY after waiting its time); at once
        REQUEST_IN_PROGRESS while an attempt under the same request id runs."""
        if request_id and key in self._busy and self._requests.get(key) == request_id:
            raise in_progress(key, request_id)
        async with self._queues.claim(key, str(key.session)):
            self._busy.add(key)
            if request_id:
                self._requests[key] = request_id
            try:
                yield
            finally:
                self._busy.discard(key)
                self._requests.pop(key, None)

    # -- binding -------------------------------------------------------------------------

    async def sandbox_for(self, caller: Caller, inv: Invocation) -> SessionSandbox:
        """The session's sandbox: the one it has, or a new one (warm if a pool has one) under a
        lease on the session, starting from its committed state."""
        key = SandboxKey.of(caller, inv.session)
        current = self._bound.get(key)
        if current is not None and current.sandbox.alive and current.sandbox.version == inv.version.name:
            if current.owner.user != caller.user:
                # Another user of the tenant than the one who bound the sandbox: sessions decides
                # whether it may continue the session (an operator may, another invoker may not),
                # renewing the lease in its name.
                await self._sessions.renew(
                    caller, inv.session, current.lease_id, self._settings.lease_ttl_s
                )
            return current
        if current is not None:
            await self.drop(key)
        # A warm sandbox, or a slot to start one in, before the lease is asked for: a refusal
        # costs nothing elsewhere.
        sandbox = self._pools.take(inv.version, inv.digest) if self._pools else None
        warm = sandbox is not None
        slot = None if warm else await self.admit()
        try:
            lease = await self._sessions.acquire(
                caller, inv.session, self._holder, self._settings.lease_ttl_s)
        except BaseException:
            self._unused(inv.version, sandbox, slot)
            raise
        try:
            await self._bundles.check_pin(caller.tenant, inv.version, inv.digest)
            bundle = await self._bundles.ensure(inv.version, inv.digest)
            if self._pools is not None:
                self._pools.record(inv.version, hit=warm)
            if sandbox is None:
                assert slot is not None
                sandbox = await self._starter.start_bundle(bundle, slot)
        except BaseException:
            self._unused(inv.version, sandbox if warm else None, slot)
            await self._release(caller, inv.session, lease.lease_id)
            raise
        sandbox.bind(inv.session.name, warm=warm)
        bound = SessionSandbox(key, sandbox, bundle.manifest, caller, lease.lease_id, lease.committed)
        self._bound[key] = bound
        self._metrics.live.set(len(self._bound))
        log.info("sandbox pid %s (%s) serves %s on %s", sandbox.process.pid if sandbox.process else "?",
                 "warm" if warm else "cold start", key, inv.version)
        return bound

    def _unused(self, version: VersionRef, warm: Sandbox | None, slot: Slot | None) -> None:
        """What a session that could not bind its sandbox took: the warm sandbox goes back to
        its pool, the slot comes free (a no-op once a sandbox that held it was stopped)."""
        if warm is not None and self._pools is not None:
            self._pools.give_back(version, warm)
        if slot is not None:
            slot.release()

    async def admit(self) -> Slot:
        """A slot for a new sandbox to start in: a free one, else one freed by stopping a warm
        sandbox or the least recently used idle one (idle at least `evict_idle_s`); then its
        turn to start (`SandboxSlots.start_turn`: a bounded wait). With no slot, or the starts
        and their queue full, ResourceExhausted EXECUTOR_AT_CAPACITY at once. Sandboxes already
        stopping are waited for briefly: their slots are about to come free."""
        if not self._slots.can_queue_start():
            raise self._slots.too_many_starting()
        while True:
            slot = self._slots.try_take()
            if slot is not None:
                break
            if self._pools is not None and await self._pools.evict_one():
                continue
            if await self._evict_idle():
                continue
            if not self._slots.stopping or not await self._slots.wait_returned(STOPPING_WAIT_S):
                raise self._slots.at_capacity()
        try:
            await self._slots.start_turn(slot)
        except BaseException:
            slot.release()
            raise
        return slot

    async def _evict_idle(self) -> bool:
        now = time.monotonic()
        idle = [
            b for k, b in self._bound.items()
            if k not in self._busy and now - b.sandbox.last_used >= self._settings.evict_idle_s
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda b: b.sandbox.last_used)
        log.info("stopping the sandbox of %s, idle for %.1fs, to make room", victim.key,
                 now - victim.sandbox.last_used)
        return await self.drop(victim.key)

    async def drop(self, key: SandboxKey) -> bool:
        """Stops the session's sandbox and gives up its lease; False if it had none here."""
        bound = self._bound.pop(key, None)
        if bound is None:
            return False
        self._metrics.live.set(len(self._bound))
        await bound.sandbox.stop()
        await self._release(bound.owner, key.session, bound.lease_id)
        return True

    async def stop(self, tenant: str | None, session: SessionRef) -> bool:
        """Stops the session's sandbox in `tenant` (None: the session's in every tenant);
        False if there was none."""
        keys = [k for k in self._bound if k.session == session and tenant in (None, k.tenant)]
        for key in keys:
            # An invocation still streaming sees its worker go away: it should say why.
            self._bound[key].stopped = True
        stopped = [await self.drop(key) for key in keys]
        return any(stopped)

    async def _release(self, caller: Caller, session: SessionRef, lease_id: str) -> None:
        try:
            await self._sessions.release(caller, session, lease_id)
        except Exception as exc:  # noqa: BLE001 - the lease expires by itself
            log.warning("could not release the lease of %s: %s", session, exc)

    def in_use(self) -> int:
        return len(self._bound)

    def running_digests(self) -> set[str]:
        """The bundles the sandboxes here run: bound to a session, or warm."""
        warm = self._pools.ready() if self._pools else []
        return {b.sandbox.digest for b in self._bound.values()} | {sb.digest for sb in warm}

    # -- what operators see --------------------------------------------------------------

    def listing(self, tenant: str | None) -> list[SandboxInfo]:
        """The sandboxes of `tenant`'s sessions (None: of every tenant's), IDLE or BUSY, and the
        warm pools' (WARM, which belong to no session yet)."""
        now_wall, now_mono = time.time(), time.monotonic()
        kinds = [
            (b.sandbox, SandboxState.BUSY if k in self._busy else SandboxState.IDLE)
            for k, b in self._bound.items()
            if tenant in (None, k.tenant)
        ]
        kinds += [(sb, SandboxState.WARM) for sb in (self._pools.ready() if self._pools else [])]
        return [self._info(sb, state, now_wall, now_mono) for sb, state in kinds]

    def _info(self, sb: Sandbox, state: SandboxState, now_wall: float, now_mono: float) -> SandboxInfo:
        usage = sb.usage()
        return SandboxInfo(
            id=sb.id, session=sb.session, version=sb.version, state=state,
            driver=self._starter.driver.name, pid=sb.process.pid if sb.process else 0,
            start_time=datetime.fromtimestamp(sb.started, UTC),
            last_used_time=datetime.fromtimestamp(now_wall - (now_mono - sb.last_used), UTC),
            age_s=max(0.0, now_wall - sb.started),
            memory_bytes=usage.memory_bytes, cpu_seconds=usage.cpu_seconds,
        )

    # -- background: idle timeouts, lifetimes, lease renewal -----------------------------

    async def _reap(self) -> None:
        now = time.monotonic()
        for key, bound in list(self._bound.items()):
            if key in self._busy:
                continue
            sb, manifest = bound.sandbox, bound.manifest
            expired = not sb.alive or time.time() - sb.bound_at > manifest.max_lifetime_s
            if not expired and now - sb.last_used > manifest.idle_timeout_s and await _busy_inside(sb):
                sb.last_used = now  # AgentCore's contract: a HealthyBusy agent is not idle
                continue
            if key in self._busy or self._bound.get(key) is not bound:
                continue  # an invocation arrived while the agent was asked
            if expired or now - sb.last_used > manifest.idle_timeout_s:
                log.info("stopping sandbox of %s (idle, expired or exited)", key)
                await self.drop(key)

    async def _renew(self) -> None:
        for key, bound in list(self._bound.items()):
            try:
                await self._sessions.renew(
                    bound.owner, key.session, bound.lease_id, self._settings.lease_ttl_s
                )
            except Exception as exc:  # noqa: BLE001
                # Only the sandbox whose lease this was: the session may have been dropped and
                # bound again (with a new lease) while the renewal was on its way.
                if key not in self._busy and self._bound.get(key) is bound:
                    log.warning("lost the lease of %s (%s); stopping its sandbox", key, exc)
                    await self.drop(key)


def in_progress(key: SandboxKey, request_id: str) -> Aborted:
    return Aborted(
        f"session {key.session} is still running the first attempt of request_id "
        f"{request_id!r}; retry with the same request id once it ends to get its result",
        reason=REASON_REQUEST_IN_PROGRESS, metadata={"request_id": request_id},
    )


async def _busy_inside(sandbox: Sandbox) -> bool:
    """Whether an http-protocol agent reports background work on its /ping."""
    return sandbox.spec.protocol == "http" and await sandbox.ping() == "HealthyBusy"
