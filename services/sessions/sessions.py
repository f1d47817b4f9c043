"""Sessions: the record of each conversation, its version pin, its state (compare-and-set on an
etag), its turns and the lease that lets one invocation at a time run on it. No gRPC here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from corral.names import EndpointRef, SessionRef, VersionRef
from services.common import tenancy
from services.common.background import TaskSet
from services.common.clock import Clock, IdSource, RandomIds, SystemClock
from services.common.errors import (
    Aborted,
    AlreadyExists,
    CorralError,
    FailedPrecondition,
    InvalidArgument,
)
from services.common.identity import Caller
from services.common.paging import Page, PageQuery
from services.common.requests import REASON_REQUEST_ALREADY_COMMITTED
from services.common.tenancy import Access, SessionOwner
from services.sessions import fleet_rules, rules
from services.sessions.fleet_model import FleetStore, SandboxStopAt
from services.sessions.model import (
    LeaseStore,
    NewSession,
    PinCheck,
    PinnedSessions,
    PinnedVersion,
    RequestAlreadyRecorded,
    SandboxStop,
    SessionFilter,
    SessionKey,
    SessionLease,
    SessionRecord,
    SessionState,
    SessionStatus,
    SessionStore,
    Turn,
)

log = logging.getLogger(__name__)

REASON_SESSION_BUSY = "SESSION_BUSY"
REASON_STATE_CONFLICT = "STATE_CONFLICT"
REASON_LEASE_LOST = "LEASE_LOST"
REASON_SESSION_STOPPED = "SESSION_STOPPED"
REASON_SESSION_EXPIRED = "SESSION_EXPIRED"
REASON_HELD_ELSEWHERE = "SESSION_HELD_ELSEWHERE"
REASON_PLACEMENT_CONFLICT = "PLACEMENT_CONFLICT"


def _key(caller: Caller, session: SessionRef) -> SessionKey:
    """The session `session` names in the caller's tenant."""
    return SessionKey(tenancy.acting_tenant(caller), session.session)


def _lease_lost(session: SessionRef, lease_id: str) -> Aborted:
    return Aborted(
        f"lease {lease_id} on {session.name} is no longer held (it expired "
        "or was released); acquire a new lease and run the turn again",
        reason=REASON_LEASE_LOST,
        metadata={"session": session.name},
    )


def _busy(name: str) -> Aborted:
    return Aborted(
        f"session {name} is busy: another invocation is running on it; retry when it finishes",
        reason=REASON_SESSION_BUSY,
        metadata={"session": name},
    )


def _sort_key(record: SessionRecord) -> tuple[datetime, str]:
    return record.create_time, record.id


class Sessions:
    def __init__(
        self,
        store: SessionStore,
        leases: LeaseStore,
        clock: Clock | None = None,
        ids: IdSource | None = None,
        pins: PinCheck | None = None,
        sandboxes: SandboxStop | None = None,
        fleet: FleetStore | None = None,
        fleet_sandboxes: SandboxStopAt | None = None,
    ) -> None:
        self._store = store
        self._leases = leases
        # None only where no registry or executor is in play (the domain's unit tests).
        self._pins = pins
        self._sandboxes = sandboxes
        # None where no fleet is in play (the domain's unit tests): a held lease is then busy.
        self._fleet = fleet
        self._fleet_sandboxes = fleet_sandboxes
        self._background = TaskSet("stopping a sandbox whose lease was taken over")
        self._clock = clock or SystemClock()
        self._ids = ids or RandomIds()

    async def create(
        self, caller: Caller, session: SessionRef | None, spec: NewSession, *, verify_pin: bool = True
    ) -> SessionRecord:
        """Creates the session under the caller's tenant and user; with no `session`, an id is
        generated. With `verify_pin`, the pin must name a version of the caller's tenant."""
        tenant = tenancy.acting_tenant(caller)
        session_id = session.session if session is not None else self._ids.new_id()
        tenancy.check_session(
            caller, SessionOwner(tenant, caller.user), Access.WRITE, SessionRef(session_id).name
        )
        rules.check_pin(spec)
        if verify_pin and self._pins is not None:
            # The pin is what the caller wrote: it must name a version of the caller's tenant,
            # with those bytes, or the executor would run another tenant's code for it.
            await self._pins.check(tenant, spec.pin.version, spec.pin.digest)
        idle = rules.timeout_seconds(
            spec.idle_timeout_s, "session.idle_timeout", rules.DEFAULT_IDLE_TIMEOUT_S
        )
        lifetime = rules.timeout_seconds(
            spec.max_lifetime_s, "session.max_lifetime", rules.DEFAULT_MAX_LIFETIME_S
        )
        now = self._clock.now()
        record = SessionRecord(
            id=session_id,
            agent=spec.agent.name,
            version=spec.pin.version.name,
            version_digest=spec.pin.digest,
            endpoint=spec.endpoint.name if spec.endpoint is not None else "",
            tenant=tenant,
            user=caller.user,
            status=SessionStatus.ACTIVE,
            turn_count=0,
            state_etag=self._ids.new_id(),
            create_time=now,
            update_time=now,
            last_active_time=now,
            idle_timeout_s=idle,
            max_lifetime_s=lifetime,
            executor=spec.executor,
        )
        stored = await self._store.insert(record)
        if stored is None:
            raise AlreadyExists(
                f"{record.name} already exists; choose another session_id, or leave it empty "
                "to have one generated",
                metadata={"session": record.name},
            )
        log.info(
            "created %s pinned to %s for %s/%s",
            record.name,
            record.version,
            caller.tenant,
            caller.user,
        )
        return stored

    async def get(self, caller: Caller, session: SessionRef) -> SessionRecord:
        return await self._owned(caller, session, Access.READ)

    async def list(
        self, caller: Caller, where: SessionFilter, page_size: int, page_token: str
    ) -> Page[SessionRecord]:
        """The caller's tenant's sessions matching `where` (every tenant's for a service acting
        for all), newest first, a page at a time."""
        tenant = tenancy.readable_tenant(caller, "sessions")
        query = PageQuery.start(
            # Named for the order: a token from when the listing was oldest first is refused
            # (INVALID_ARGUMENT), not read as a position in the other direction.
            "ListSessions/newest-first", owner=tenant or "", where=where, page_size=page_size,
            token=page_token, key_shape=(datetime, str),
        )
        # Expiry is computed on read; persisting it first keeps the status filter truthful.
        await self._store.expire_due(tenant, self._clock.now())
        rows = await self._store.list(tenant, where, query.after, query.fetch_limit)
        return query.page(rows, key=_sort_key)

    async def delete(self, caller: Caller, session: SessionRef) -> None:
        """Deletes the session with its state, turns and lease. A live one is stopped first and
        its sandbox ended, so nothing of it runs on (an executor that cannot be reached reaps
        the sandbox by itself at its idle timeout)."""
        record = await self._owned(caller, session, Access.WRITE)
        if record.status is SessionStatus.ACTIVE:
            await self._store.set_status(
                record.key, SessionStatus.STOPPED, self._clock.now(), only_from=SessionStatus.ACTIVE
            )
            await self._stop_sandbox(caller, record)
        if not await self._store.delete(record.key):
            raise tenancy.not_found(session.name)
        await self._leases.drop(record.key)
        log.info("deleted %s", record.key)

    async def _stop_sandbox(self, caller: Caller, record: SessionRecord) -> None:
        member = None
        if self._fleet is not None and record.executor:
            member = await self._fleet.member(record.executor)
        if member is not None and self._fleet_sandboxes is not None:
            await self._stop_at(member.address, caller, record)
            return
        if self._sandboxes is None:
            return
        try:
            await self._sandboxes.stop_sandbox(caller, record.ref)
        except CorralError as exc:
            log.warning("could not end the sandbox of %s: %s", record.key, exc.message)

    async def stop(self, caller: Caller, session: SessionRef) -> SessionRecord:
        record = await self._owned(caller, session, Access.WRITE)
        if record.status is not SessionStatus.ACTIVE:
            return record  # already ended: stopping again is a no-op, and EXPIRED stays EXPIRED
        now = self._clock.now()
        stopped = await self._store.set_status(
            record.key, SessionStatus.STOPPED, now, only_from=SessionStatus.ACTIVE
        )
        return stopped or await self._owned(caller, session, Access.WRITE)

    async def get_state(self, caller: Caller, session: SessionRef) -> SessionState:
        record, state = await self._owned_state(caller, session)
        return SessionState(session.session, state, record.state_etag, record.turn_count)

    async def update_state(
        self, caller: Caller, session: SessionRef, state: bytes, etag: str
    ) -> SessionState:
        rules.check_state_size(state)
        if not etag:
            raise InvalidArgument.field(
                "etag", "is required: read the state with GetSessionState and pass its etag"
            )
        record = await self._owned(caller, session, Access.WRITE)
        return await self._write(record.key, state, etag, None)

    async def acquire_lease(
        self, caller: Caller, session: SessionRef, holder: str, ttl_s: float | None
    ) -> SessionLease:
        ttl = rules.lease_ttl(ttl_s)
        record = await self._owned(caller, session, Access.WRITE)
        key = record.key
        if record.status is not SessionStatus.ACTIVE:
            ended = record.status.value.lower()
            raise FailedPrecondition(
                f"{record.name} is {ended} and takes no more invocations; start a new session",
                reason=REASON_SESSION_STOPPED
                if record.status is SessionStatus.STOPPED
                else REASON_SESSION_EXPIRED,
                metadata={"session": record.name},
            )
        lease_id = self._ids.new_id()
        now = self._clock.now()
        if not await self._leases.acquire(key, lease_id, holder, ttl):
            await self._take_over(caller, record, lease_id, holder, ttl)
        try:
            # Read the state only once the lease is ours, so no other turn can commit under us.
            loaded = await self._store.touch_and_load(key, now)
            if loaded is None:
                raise tenancy.not_found(session.name)
        except BaseException:
            await self._leases.release(key, lease_id)
            raise
        current, state = loaded
        return SessionLease(
            session.session,
            lease_id,
            holder,
            now + timedelta(seconds=ttl),
            SessionState(session.session, state, current.state_etag, current.turn_count),
        )

    async def _take_over(
        self, caller: Caller, record: SessionRecord, lease_id: str, holder: str, ttl: float
    ) -> None:
        """Takes the session's lease from the executor that holds it when that one is gone from
        the fleet, drained, the requester itself restarted, or not where the session is placed
        (fleet_rules.takes_over); refuses saying who holds it otherwise."""
        if self._fleet is None:
            raise _busy(record.name)
        current = await self._leases.current(record.key)
        if current is None:  # released meanwhile
            if await self._leases.acquire(record.key, lease_id, holder, ttl):
                return
            raise _busy(record.name)
        old_lease, old_holder = current
        member = await self._fleet.member(old_holder)
        if not fleet_rules.takes_over(
            holder=old_holder, requester=holder, placed_on=record.executor,
            holder_live=member is not None, holder_draining=member is not None and member.draining,
        ):
            raise FailedPrecondition(
                f"{record.name} is held by executors/{old_holder}, where its turns run; send "
                "them there (the router does), or retry once that executor is drained or gone",
                reason=REASON_HELD_ELSEWHERE,
                metadata={"session": record.name, "executor": f"executors/{old_holder}"},
            )
        if not await self._leases.take_over(record.key, old_lease, lease_id, holder, ttl):
            raise _busy(record.name)  # another taker won the race
        log.info("%s: lease taken over by %s from %s (%s)", record.key, holder, old_holder,
                 "live" if member is not None else "gone")
        if member is not None and old_holder != holder and self._fleet_sandboxes is not None:
            # Its sandbox would only hold memory until its idle timeout (it can no longer commit).
            self._background.spawn(self._stop_at(member.address, caller, record))

    async def _stop_at(self, address: str, caller: Caller, record: SessionRecord) -> None:
        assert self._fleet_sandboxes is not None
        try:
            await self._fleet_sandboxes.stop_sandbox_at(address, caller, record.ref)
        except CorralError as exc:
            log.warning("could not end the old sandbox of %s at %s: %s", record.key, address,
                        exc.message)

    async def place(
        self, caller: Caller, session: SessionRef, executor: str, expected: str
    ) -> SessionRecord:
        """Records the executor the session's turns go to, if it is still `expected`."""
        record = await self._owned(caller, session, Access.WRITE)
        placed = await self._store.place(record.key, executor, expected)
        if placed is not None:
            log.info("%s placed on executors/%s (was %r)", record.key, executor, expected)
            return placed
        current = await self._owned(caller, session, Access.WRITE)
        if current.executor == executor:
            return current  # another router placed it there first
        raise Aborted(
            f"{record.name} is placed on executors/{current.executor or '(none)'}, not "
            f"executors/{expected or '(none)'}; read it again and send its turn there",
            reason=REASON_PLACEMENT_CONFLICT,
            metadata={"session": record.name, "executor": f"executors/{current.executor}"},
        )

    async def renew_lease(
        self, caller: Caller, session: SessionRef, lease_id: str, ttl_s: float | None
    ) -> SessionLease:
        rules.require_lease_id(lease_id)
        ttl = rules.lease_ttl(ttl_s)
        key = (await self._owned(caller, session, Access.WRITE)).key
        now = self._clock.now()
        holder = await self._leases.renew(key, lease_id, ttl)
        if holder is None:
            raise _lease_lost(session, lease_id)
        # A turn that keeps renewing is activity: the session must not go idle under it.
        await self._store.touch(key, now)
        return SessionLease(session.session, lease_id, holder, now + timedelta(seconds=ttl))

    async def release_lease(self, caller: Caller, session: SessionRef, lease_id: str) -> None:
        rules.require_lease_id(lease_id)
        key = (await self._owned(caller, session, Access.WRITE)).key
        # Releasing a lease that is already gone is a success, so callers can retry it freely.
        if not await self._leases.release(key, lease_id):
            log.info("lease %s on %s was already gone at release", lease_id, session.name)

    async def commit_turn(
        self,
        caller: Caller,
        session: SessionRef,
        lease_id: str,
        etag: str,
        state: bytes,
        turn: Turn,
    ) -> SessionState:
        rules.require_lease_id(lease_id)
        if not etag:
            raise InvalidArgument.field(
                "etag", "is required: pass the etag of the state the turn started from"
            )
        rules.check_state_size(state)
        rules.check_turn(turn)
        # Ownership and the lease are independent reads: ask both at once.
        key = _key(caller, session)
        _, holder = await asyncio.gather(
            self._owned(caller, session, Access.WRITE), self._leases.holder(key)
        )
        if holder != lease_id:
            raise _lease_lost(session, lease_id)
        # The etag compare-and-set (not the lease check above) is what keeps a late turn from
        # overwriting a newer one: a lease can expire between the check and the write.
        return await self._write(key, state, etag, turn)

    async def retire_version(
        self,
        caller: Caller,
        version: VersionRef,
        endpoint: EndpointRef | None,
        to: PinnedVersion | None,
    ) -> int:
        """Migrates (to a version) or stops (to None) the active sessions pinned to `version`,
        those routed through `endpoint` or all. A platform operation used by rollbacks: a service
        acting for every tenant retires them in every tenant, anyone else in its own."""
        tenant = tenancy.tenant_scope(caller)
        count = await self._store.retire_version(tenant, version, endpoint, self._clock.now(), to)
        action = f"migrated to {to.version.name}" if to is not None else "stopped"
        log.info(
            "%d sessions on %s %s (by %s/%s)",
            count,
            version.name,
            action,
            caller.tenant,
            caller.user,
        )
        return count

    async def count_pinned(self, caller: Caller, versions: Sequence[VersionRef]) -> Sequence[PinnedSessions]:
        """The caller's tenant's sessions on each of `versions` (the registry asks before it
        deletes one). Expiry is settled first, so a session past its timeouts is not counted as
        active."""
        rules.check_pinned_query(versions)
        tenant = tenancy.acting_tenant(caller)
        await self._store.expire_due(tenant, self._clock.now())
        return await self._store.pinned(tenant, versions)

    async def _write(
        self, session: SessionKey, state: bytes, etag: str, turn: Turn | None
    ) -> SessionState:
        new_etag = self._ids.new_id()
        name = SessionRef(session.id).name
        try:
            written = await self._store.write_state(
                session, state, expected_etag=etag, new_etag=new_etag,
                now=self._clock.now(), turn=turn,
            )
        except RequestAlreadyRecorded:
            request_id = turn.request.request_id if turn and turn.request else ""
            raise Aborted(
                f"{name} already committed a turn under request_id {request_id!r}; this one "
                "was not committed: look that turn up (LookupTurnResult) rather than run it again",
                reason=REASON_REQUEST_ALREADY_COMMITTED,
                metadata={"session": name, "request_id": request_id},
            ) from None
        if written is None:
            if await self._store.get(session) is None:
                raise tenancy.not_found(name)
            raise Aborted(
                f"the state of {name} changed since etag {etag!r} "
                "was read; re-read it with GetSessionState (or a new lease) and retry",
                reason=REASON_STATE_CONFLICT,
                metadata={"session": name},
            )
        return SessionState(session.id, state, written.state_etag, written.turn_count)

    async def _owned(self, caller: Caller, session: SessionRef, access: Access) -> SessionRecord:
        """The session in the caller's tenant, if the caller may read or change it (see
        services/common/tenancy.py): NotFound as if absent when it may not even know of it."""
        record = await self._store.get(_key(caller, session))
        if record is None:
            raise tenancy.not_found(session.name)
        tenancy.check_session(caller, record.owner, access, session.name)
        return await self._settle_expiry(record)

    async def _owned_state(
        self, caller: Caller, session: SessionRef
    ) -> tuple[SessionRecord, bytes]:
        loaded = await self._store.get_state(_key(caller, session))
        if loaded is None:
            raise tenancy.not_found(session.name)
        tenancy.check_session(caller, loaded[0].owner, Access.READ, session.name)
        return await self._settle_expiry(loaded[0]), loaded[1]

    async def _settle_expiry(self, record: SessionRecord) -> SessionRecord:
        now = self._clock.now()
        if not record.is_expired(now):
            return record
        expired = await self._store.set_status(
            record.key, SessionStatus.EXPIRED, now, only_from=SessionStatus.ACTIVE
        )
        if expired is not None:
            log.info("%s expired", record.name)
            return expired
        # Someone else changed its status meanwhile; theirs is the one to report.
        current = await self._store.get(record.key)
        if current is None:
            raise tenancy.not_found(record.name)
        return current
