"""The sessions domain's values and the ports it is built on (storage, leases, clock, ids)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from corral.names import AgentRef, EndpointRef, SessionRef, VersionRef
from services.common.identity import Caller
from services.common.paging import Key
from services.common.tenancy import SessionOwner


class SessionStatus(enum.Enum):
    ACTIVE = "ACTIVE"
    STOPPED = "STOPPED"
    EXPIRED = "EXPIRED"


@dataclass(frozen=True)
class SessionKey:
    """How a session is found: the same id in two tenants is two sessions."""

    tenant: str
    id: str

    def __str__(self) -> str:
        return f"sessions/{self.id} of tenant {self.tenant!r}"


@dataclass(frozen=True)
class SessionRecord:
    id: str
    agent: str
    version: str
    version_digest: str
    endpoint: str
    tenant: str
    user: str
    status: SessionStatus
    turn_count: int
    state_etag: str
    create_time: datetime
    update_time: datetime
    last_active_time: datetime
    idle_timeout_s: int
    max_lifetime_s: int
    # The executor its turns go to (bare name; "" when never placed).
    executor: str = ""

    def is_expired(self, now: datetime) -> bool:
        """True once the idle timeout or the max lifetime has passed (for a live session).
        store.expire_due applies the same rule in SQL; keep the two in step."""
        if self.status is not SessionStatus.ACTIVE:
            return False
        idle = now - self.last_active_time > timedelta(seconds=self.idle_timeout_s)
        old = now - self.create_time > timedelta(seconds=self.max_lifetime_s)
        return idle or old

    @property
    def ref(self) -> SessionRef:
        return SessionRef(self.id)

    @property
    def key(self) -> SessionKey:
        return SessionKey(self.tenant, self.id)

    @property
    def owner(self) -> SessionOwner:
        return SessionOwner(self.tenant, self.user)

    @property
    def name(self) -> str:
        return self.ref.name


@dataclass(frozen=True)
class SessionState:
    session_id: str
    state: bytes
    etag: str
    turn_count: int


@dataclass(frozen=True)
class SessionLease:
    session_id: str
    lease_id: str
    holder: str
    expire_time: datetime
    # Only AcquireLease returns the state the holder starts from.
    state: SessionState | None = None


@dataclass(frozen=True)
class PinnedVersion:
    """A version as a session is pinned to it: by name, and by the digest of its bundle."""

    version: VersionRef
    digest: str


@dataclass(frozen=True, kw_only=True)
class NewSession:
    """What a caller may choose when creating a session; everything else is the platform's.
    By keyword: its two timeouts would be easy to swap."""

    agent: AgentRef
    pin: PinnedVersion
    endpoint: EndpointRef | None = None
    idle_timeout_s: float | None = None
    max_lifetime_s: float | None = None
    # The executor the router placed it on (bare name), if any.
    executor: str = ""


@dataclass(frozen=True)
class SessionFilter:
    """Which sessions a listing keeps; None matches any. Its repr binds page tokens to it."""

    agent: AgentRef | None = None
    version: VersionRef | None = None
    status: SessionStatus | None = None


@dataclass(frozen=True)
class PinnedSessions:
    """The sessions pinned to one version: how many still take invocations, and when any of
    them was last active."""

    version: str
    active: int
    last_active_time: datetime | None


@dataclass(frozen=True)
class TurnRequest:
    """The caller's request id a turn ran under, recorded with its result (AIP-155)."""

    request_id: str
    # sha256:... of the request's content type and payload (services/common/requests.py).
    digest: str
    content_type: str
    trace_id: str


@dataclass(frozen=True)
class TurnResult:
    """A turn committed under a request id, as its caller received it."""

    turn: int
    output: bytes
    content_type: str
    version: str
    invocation_id: str
    trace_id: str
    commit_time: datetime
    digest: str


@dataclass(frozen=True)
class Turn:
    invocation_id: str
    input: bytes
    output: bytes
    # None: the caller gave no request id, so nothing is recorded for a retry.
    request: TurnRequest | None = None


class RequestAlreadyRecorded(Exception):
    """A turn's commit met a result already recorded for the session under its request id: the
    commit did not happen."""


class SessionStore(Protocol):
    """PostgreSQL is the record; implementations may cache, but every write is durable first."""

    async def insert(self, record: SessionRecord) -> SessionRecord | None:
        """The stored record, or None when its tenant has a session by that id."""
        ...

    async def get(self, session: SessionKey) -> SessionRecord | None: ...

    async def get_state(self, session: SessionKey) -> tuple[SessionRecord, bytes] | None: ...

    async def list(
        self, tenant: str | None, where: SessionFilter, after: Key | None, limit: int
    ) -> list[SessionRecord]:
        """The tenant's (None: every tenant's) sessions matching `where`, newest first (descending
        (create_time, id)), after the key (create_time, id) `after` when one is given."""
        ...

    async def set_status(
        self, session: SessionKey, status: SessionStatus, now: datetime, only_from: SessionStatus
    ) -> SessionRecord | None:
        """Changes the status if it is `only_from`; None if it was not or the session is gone."""
        ...

    async def retire_version(
        self, tenant: str | None, version: VersionRef, endpoint: EndpointRef | None,
        now: datetime, to: PinnedVersion | None,
    ) -> int:
        """Re-pins every active session on `version` (routed through `endpoint`, or any) to `to`,
        or stops them when there is none; returns how many. Of `tenant`, or (None) of every
        tenant."""
        ...

    async def expire_due(self, tenant: str | None, now: datetime) -> int:
        """Marks the tenant's (None: every tenant's) live sessions past their timeouts EXPIRED;
        returns how many."""
        ...

    async def touch(self, session: SessionKey, now: datetime) -> SessionRecord | None: ...

    async def touch_and_load(
        self, session: SessionKey, now: datetime
    ) -> tuple[SessionRecord, bytes] | None:
        """touch(), returning the committed state as well."""
        ...

    async def write_state(
        self, session: SessionKey, state: bytes, *, expected_etag: str, new_etag: str,
        now: datetime, turn: Turn | None,
    ) -> SessionRecord | None:
        """Compare-and-set in one transaction; with a turn, also counts it and appends its event.
        None (and nothing written) when the etag is not the current one or the session is gone."""
        ...

    async def delete(self, session: SessionKey) -> bool: ...

    async def place(
        self, session: SessionKey, executor: str, expected: str
    ) -> SessionRecord | None:
        """Records `executor` if the session's is `expected`; None when it is not (or the
        session is gone)."""
        ...

    async def pinned(self, tenant: str, versions: Sequence[VersionRef]) -> Sequence[PinnedSessions]:
        """For each of the tenant's `versions` that has sessions: its active ones and their
        latest activity."""
        ...


class LeaseStore(Protocol):
    """Leases expire on their own; check-and-set operations must be atomic."""

    async def acquire(self, session: SessionKey, lease_id: str, holder: str, ttl_s: float) -> bool: ...

    async def renew(self, session: SessionKey, lease_id: str, ttl_s: float) -> str | None:
        """Extends the lease if `lease_id` holds it and returns its holder; None if it does not."""
        ...

    async def release(self, session: SessionKey, lease_id: str) -> bool:
        """Removes the lease if `lease_id` holds it; never removes another holder's."""
        ...

    async def holder(self, session: SessionKey) -> str | None:
        """The lease id currently holding the session, if any."""
        ...

    async def current(self, session: SessionKey) -> tuple[str, str] | None:
        """The lease id and the holder of the session's lease, if any."""
        ...

    async def take_over(
        self, session: SessionKey, old_lease_id: str, lease_id: str, holder: str, ttl_s: float
    ) -> bool:
        """Replaces the lease `old_lease_id` with a new one, atomically; False if
        `old_lease_id` no longer holds it."""
        ...

    async def drop(self, session: SessionKey) -> None: ...


class PinCheck(Protocol):
    """Whether `tenant` has `version` with `digest`: NotFound when it has no such version,
    InvalidArgument (session.version_digest) when its bytes differ."""

    async def check(self, tenant: str, version: VersionRef, digest: str) -> None: ...


class SandboxStop(Protocol):
    """The executor, ending the sandbox of a session that is being deleted."""

    async def stop_sandbox(self, caller: Caller, session: SessionRef) -> None: ...
