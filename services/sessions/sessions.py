"""Sessions: the record of each conversation, its version pin, its state (compare-and-set on an
etag), its turns and the lease that lets one invocation at a time run on it. No gRPC here."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from corral import names
from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.common.identity import Caller
from services.sessions import rules
from services.sessions.model import (
    Clock,
    IdSource,
    LeaseStore,
    NewSession,
    RandomIds,
    SessionFilter,
    SessionLease,
    SessionPage,
    SessionRecord,
    SessionState,
    SessionStatus,
    SessionStore,
    SystemClock,
    Turn,
)

log = logging.getLogger(__name__)

REASON_SESSION_BUSY = "SESSION_BUSY"
REASON_STATE_CONFLICT = "STATE_CONFLICT"
REASON_LEASE_LOST = "LEASE_LOST"
REASON_SESSION_STOPPED = "SESSION_STOPPED"
REASON_SESSION_EXPIRED = "SESSION_EXPIRED"


def _not_found(session_id: str) -> NotFound:
    return NotFound(f"{names.session_name(session_id)} not found; create it with CreateSession")


def _lease_lost(session_id: str, lease_id: str) -> Aborted:
    return Aborted(
        f"lease {lease_id} on {names.session_name(session_id)} is no longer held (it expired "
        "or was released); acquire a new lease and run the turn again",
        reason=REASON_LEASE_LOST,
        metadata={"session": names.session_name(session_id)},
    )


class Sessions:
    def __init__(
        self,
        store: SessionStore,
        leases: LeaseStore,
        clock: Clock | None = None,
        ids: IdSource | None = None,
    ) -> None:
        self._store = store
        self._leases = leases
        self._clock = clock or SystemClock()
        self._ids = ids or RandomIds()

    async def create(self, caller: Caller, session_id: str, spec: NewSession) -> SessionRecord:
        rules.validate_new_session(session_id, spec)
        idle = rules.timeout_seconds(
            spec.idle_timeout_s, "session.idle_timeout", rules.DEFAULT_IDLE_TIMEOUT_S
        )
        lifetime = rules.timeout_seconds(
            spec.max_lifetime_s, "session.max_lifetime", rules.DEFAULT_MAX_LIFETIME_S
        )
        now = self._clock.now()
        record = SessionRecord(
            id=session_id or self._ids.new_id(),
            agent=spec.agent,
            version=spec.version,
            version_digest=spec.version_digest,
            endpoint=spec.endpoint,
            tenant=caller.tenant,
            user=caller.user,
            status=SessionStatus.ACTIVE,
            turn_count=0,
            state_etag=self._ids.new_id(),
            create_time=now,
            update_time=now,
            last_active_time=now,
            idle_timeout_s=idle,
            max_lifetime_s=lifetime,
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

    async def get(self, caller: Caller, name: str) -> SessionRecord:
        return await self._owned(caller, rules.session_id_of(name, "name"))

    async def list(
        self, caller: Caller, where: SessionFilter, size: int, page_token: str
    ) -> SessionPage:
        rules.validate_filter(where)
        limit = rules.page_size(size)
        after = rules.decode_page_token(page_token) if page_token else None
        # Expiry is computed on read; persisting it first keeps the status filter truthful.
        await self._store.expire_due(caller.tenant, self._clock.now())
        rows = await self._store.list(caller.tenant, where, after, limit + 1)
        page = rows[:limit]
        token = (
            rules.encode_page_token((page[-1].create_time, page[-1].id))
            if len(rows) > limit
            else ""
        )
        return SessionPage(sessions=page, next_page_token=token)

    async def delete(self, caller: Caller, name: str) -> None:
        session_id = rules.session_id_of(name, "name")
        await self._owned(caller, session_id)
        if not await self._store.delete(session_id):
            raise _not_found(session_id)
        await self._leases.drop(session_id)
        log.info("deleted %s", names.session_name(session_id))

    async def stop(self, caller: Caller, name: str) -> SessionRecord:
        session_id = rules.session_id_of(name, "name")
        record = await self._owned(caller, session_id)
        if record.status is not SessionStatus.ACTIVE:
            return record  # already ended: stopping again is a no-op, and EXPIRED stays EXPIRED
        stopped = await self._store.set_status(
            session_id, SessionStatus.STOPPED, self._clock.now(), only_from=SessionStatus.ACTIVE
        )
        return stopped or await self._owned(caller, session_id)

    async def get_state(self, caller: Caller, name: str) -> SessionState:
        session_id = rules.session_id_of(name, "name")
        record, state = await self._owned_state(caller, session_id)
        return SessionState(session_id, state, record.state_etag, record.turn_count)

    async def update_state(
        self, caller: Caller, name: str, state: bytes, etag: str
    ) -> SessionState:
        session_id = rules.session_id_of(name, "name")
        rules.check_state_size(state)
        if not etag:
            raise InvalidArgument.field(
                "etag", "is required: read the state with GetSessionState and pass its etag"
            )
        await self._owned(caller, session_id)
        return await self._write(session_id, state, etag, None)

    async def acquire_lease(
        self, caller: Caller, name: str, holder: str, ttl_s: float | None
    ) -> SessionLease:
        session_id = rules.session_id_of(name, "session")
        ttl = rules.lease_ttl(ttl_s)
        record = await self._owned(caller, session_id)
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
        if not await self._leases.acquire(session_id, lease_id, holder, ttl):
            raise Aborted(
                f"session {record.name} is busy: another invocation is running on it; "
                "retry when it finishes",
                reason=REASON_SESSION_BUSY,
                metadata={"session": record.name},
            )
        try:
            # Read the state only once the lease is ours, so no other turn can commit under us.
            loaded = await self._store.touch_and_load(session_id, now)
            if loaded is None:
                raise _not_found(session_id)
        except BaseException:
            await self._leases.release(session_id, lease_id)
            raise
        current, state = loaded
        return SessionLease(
            session_id,
            lease_id,
            holder,
            now + timedelta(seconds=ttl),
            SessionState(session_id, state, current.state_etag, current.turn_count),
        )

    async def renew_lease(
        self, caller: Caller, name: str, lease_id: str, ttl_s: float | None
    ) -> SessionLease:
        session_id = rules.session_id_of(name, "session")
        if not lease_id:
            raise InvalidArgument.field(
                "lease_id", "is required: pass the lease_id AcquireLease returned"
            )
        ttl = rules.lease_ttl(ttl_s)
        await self._owned(caller, session_id)
        now = self._clock.now()
        holder = await self._leases.renew(session_id, lease_id, ttl)
        if holder is None:
            raise _lease_lost(session_id, lease_id)
        # A turn that keeps renewing is activity: the session must not go idle under it.
        await self._store.touch(session_id, now)
        return SessionLease(session_id, lease_id, holder, now + timedelta(seconds=ttl))

    async def release_lease(self, caller: Caller, name: str, lease_id: str) -> None:
        session_id = rules.session_id_of(name, "session")
        if not lease_id:
            raise InvalidArgument.field(
                "lease_id", "is required: pass the lease_id AcquireLease returned"
            )
        await self._owned(caller, session_id)
        # Releasing a lease that is already gone is a success, so callers can retry it freely.
        if not await self._leases.release(session_id, lease_id):
            log.info("lease %s on sessions/%s was already gone at release", lease_id, session_id)

    async def commit_turn(
        self, caller: Caller, name: str, lease_id: str, etag: str, state: bytes, turn: Turn
    ) -> SessionState:
        session_id = rules.session_id_of(name, "session")
        if not lease_id:
            raise InvalidArgument.field(
                "lease_id", "is required: pass the lease_id AcquireLease returned"
            )
        if not etag:
            raise InvalidArgument.field(
                "etag", "is required: pass the etag of the state the turn started from"
            )
        rules.check_state_size(state)
        for field, payload in (("input", turn.input), ("output", turn.output)):
            if len(payload) > rules.MAX_TURN_PAYLOAD_BYTES:
                raise InvalidArgument.field(
                    field,
                    f"is {len(payload)} bytes, over the limit of "
                    f"{rules.MAX_TURN_PAYLOAD_BYTES} bytes (8 MiB)",
                )
        # Ownership and the lease are independent reads: ask both at once.
        _, holder = await asyncio.gather(
            self._owned(caller, session_id), self._leases.holder(session_id)
        )
        if holder != lease_id:
            raise _lease_lost(session_id, lease_id)
        # The etag compare-and-set (not the lease check above) is what keeps a late turn from
        # overwriting a newer one: a lease can expire between the check and the write.
        return await self._write(session_id, state, etag, turn)

    async def retire_version(
        self, caller: Caller, version: str, endpoint: str, to_version: str, to_digest: str
    ) -> int:
        """Migrates (to_version given) or stops the active sessions pinned to `version`. A platform
        operation used by rollbacks; it crosses tenants by design."""
        for field, value in (("version", version), ("to_version", to_version)):
            if value or field == "version":
                try:
                    names.parse_version(value)
                except names.ResourceNameError as exc:
                    raise InvalidArgument.field(field, str(exc)) from None
        if to_version and not to_digest.startswith("sha256:"):
            raise InvalidArgument.field("to_version_digest", "is required with to_version (sha256:...)")
        count = await self._store.retire_version(
            version, endpoint, self._clock.now(), to_version=to_version, to_digest=to_digest
        )
        action = f"migrated to {to_version}" if to_version else "stopped"
        log.info("%d sessions on %s %s (by %s/%s)", count, version, action, caller.tenant, caller.user)
        return count

    async def _write(
        self, session_id: str, state: bytes, etag: str, turn: Turn | None
    ) -> SessionState:
        new_etag = self._ids.new_id()
        written = await self._store.write_state(
            session_id, state, etag, new_etag, self._clock.now(), turn
        )
        if written is None:
            if await self._store.get(session_id) is None:
                raise _not_found(session_id)
            raise Aborted(
                f"the state of {names.session_name(session_id)} changed since etag {etag!r} "
                "was read; re-read it with GetSessionState (or a new lease) and retry",
                reason=REASON_STATE_CONFLICT,
                metadata={"session": names.session_name(session_id)},
            )
        return SessionState(session_id, state, written.state_etag, written.turn_count)

    async def _owned(self, caller: Caller, session_id: str) -> SessionRecord:
        record = await self._store.get(session_id)
        if record is None:
            raise _not_found(session_id)
        self._check_owner(caller, record)
        return await self._settle_expiry(record)

    async def _owned_state(self, caller: Caller, session_id: str) -> tuple[SessionRecord, bytes]:
        loaded = await self._store.get_state(session_id)
        if loaded is None:
            raise _not_found(session_id)
        self._check_owner(caller, loaded[0])
        return await self._settle_expiry(loaded[0]), loaded[1]

    @staticmethod
    def _check_owner(caller: Caller, record: SessionRecord) -> None:
        if (record.tenant, record.user) != (caller.tenant, caller.user):
            raise PermissionDenied(
                f"{record.name} belongs to another caller; use a session created under "
                "your own tenant and user",
                metadata={"session": record.name},
            )

    async def _settle_expiry(self, record: SessionRecord) -> SessionRecord:
        now = self._clock.now()
        if not record.is_expired(now):
            return record
        expired = await self._store.set_status(
            record.id, SessionStatus.EXPIRED, now, only_from=SessionStatus.ACTIVE
        )
        if expired is not None:
            log.info("%s expired", record.name)
            return expired
        # Someone else changed its status meanwhile; theirs is the one to report.
        current = await self._store.get(record.id)
        if current is None:
            raise _not_found(record.id)
        return current
