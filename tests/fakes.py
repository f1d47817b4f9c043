"""Fakes for unit tests, in one place: each stands in for one Protocol seam of a service (its
store, clock, id source, or a clients module) so a domain can be tested without a socket."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime, timedelta

from corral.names import EndpointRef, SessionRef, VersionRef
from services.common.endpoints import EndpointTraffic, EndpointUpdate
from services.common.errors import NotFound, PermissionDenied
from services.common.identity import Caller
from services.common.paging import Key
from services.router import model as router_model
from services.sessions.model import (
    PinnedVersion,
    SessionFilter,
    SessionRecord,
    SessionStatus,
    Turn,
)

# -- sessions ----------------------------------------------------------------------------------

T0 = datetime(2030, 1, 1, tzinfo=UTC)


class FakeClock:
    """A clock that moves only when a test advances it."""

    def __init__(self, start: datetime = T0) -> None:
        self.time = start

    def now(self) -> datetime:
        return self.time

    def advance(self, seconds: float) -> None:
        self.time += timedelta(seconds=seconds)


class SequentialIds:
    """id0001, id0002, ...: ids a test can predict."""

    def __init__(self) -> None:
        self.n = 0

    def new_id(self) -> str:
        self.n += 1
        return f"id{self.n:04d}"


class MemoryStore:
    """The sessions SessionStore in dicts: records, their states and their turns' events."""

    def __init__(self) -> None:
        self.records: dict[str, SessionRecord] = {}
        self.states: dict[str, bytes] = {}
        self.events: dict[str, list[tuple[int, Turn]]] = {}

    async def insert(self, record: SessionRecord) -> SessionRecord | None:
        if record.id in self.records:
            return None
        self.records[record.id], self.states[record.id] = record, b""
        self.events[record.id] = []
        return record

    async def get(self, session_id: str) -> SessionRecord | None:
        return self.records.get(session_id)

    async def get_state(self, session_id: str) -> tuple[SessionRecord, bytes] | None:
        if session_id not in self.records:
            return None
        return self.records[session_id], self.states[session_id]

    async def list(
        self, tenant: str, where: SessionFilter, after: Key | None, limit: int
    ) -> list[SessionRecord]:
        def kept(r: SessionRecord) -> bool:
            return (
                r.tenant == tenant
                and (where.agent is None or r.agent == where.agent.name)
                and (where.version is None or r.version == where.version.name)
                and (where.status is None or r.status is where.status)
            )

        def key(r: SessionRecord) -> tuple[datetime, str]:
            return r.create_time, r.id

        rows = sorted(filter(kept, self.records.values()), key=key)
        return [r for r in rows if after is None or key(r) > after][:limit]

    async def set_status(
        self, session_id: str, status: SessionStatus, now: datetime, only_from: SessionStatus
    ) -> SessionRecord | None:
        record = self.records.get(session_id)
        if record is None or record.status is not only_from:
            return None
        return self._put(dataclasses.replace(record, status=status, update_time=now))

    async def retire_version(
        self, version: VersionRef, endpoint: EndpointRef | None, now: datetime,
        to: PinnedVersion | None,
    ) -> int:
        due = [
            r
            for r in self.records.values()
            if r.version == version.name
            and (endpoint is None or r.endpoint == endpoint.name)
            and r.status is SessionStatus.ACTIVE
        ]
        for r in due:
            if to is None:
                change = dataclasses.replace(r, status=SessionStatus.STOPPED, update_time=now)
            else:
                change = dataclasses.replace(
                    r, version=to.version.name, version_digest=to.digest, update_time=now
                )
            self._put(change)
        return len(due)

    async def expire_due(self, tenant: str, now: datetime) -> int:
        due = [r for r in self.records.values() if r.tenant == tenant and r.is_expired(now)]
        for r in due:
            self._put(dataclasses.replace(r, status=SessionStatus.EXPIRED, update_time=now))
        return len(due)

    async def touch(self, session_id: str, now: datetime) -> SessionRecord | None:
        record = self.records.get(session_id)
        return (
            None if record is None else self._put(dataclasses.replace(record, last_active_time=now))
        )

    async def touch_and_load(
        self, session_id: str, now: datetime
    ) -> tuple[SessionRecord, bytes] | None:
        record = await self.touch(session_id, now)
        return None if record is None else (record, self.states.get(session_id, b""))

    async def write_state(
        self, session_id: str, state: bytes, expected_etag: str, new_etag: str, now: datetime,
        turn: Turn | None,
    ) -> SessionRecord | None:
        record = self.records.get(session_id)
        if record is None or record.state_etag != expected_etag:
            return None
        record = dataclasses.replace(
            record,
            state_etag=new_etag,
            update_time=now,
            turn_count=record.turn_count + (1 if turn else 0),
            last_active_time=now if turn else record.last_active_time,
        )
        self.states[session_id] = state
        if turn:
            self.events[session_id].append((record.turn_count, turn))
        return self._put(record)

    async def delete(self, session_id: str) -> bool:
        self.states.pop(session_id, None)
        self.events.pop(session_id, None)
        return self.records.pop(session_id, None) is not None

    def _put(self, record: SessionRecord) -> SessionRecord:
        self.records[record.id] = record
        return record


class MemoryLeases:
    """The sessions LeaseStore in a dict; a lease expires by the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.leases: dict[str, tuple[str, str, datetime]] = {}

    def _live(self, session_id: str) -> tuple[str, str, datetime] | None:
        lease = self.leases.get(session_id)
        if lease and lease[2] <= self.clock.now():
            del self.leases[session_id]
            return None
        return lease

    async def acquire(self, session_id: str, lease_id: str, holder: str, ttl_s: float) -> bool:
        if self._live(session_id):
            return False
        self.leases[session_id] = (lease_id, holder, self.clock.now() + timedelta(seconds=ttl_s))
        return True

    async def renew(self, session_id: str, lease_id: str, ttl_s: float) -> str | None:
        lease = self._live(session_id)
        if not lease or lease[0] != lease_id:
            return None
        self.leases[session_id] = (lease_id, lease[1], self.clock.now() + timedelta(seconds=ttl_s))
        return lease[1]

    async def release(self, session_id: str, lease_id: str) -> bool:
        lease = self._live(session_id)
        if not lease or lease[0] != lease_id:
            return False
        del self.leases[session_id]
        return True

    async def holder(self, session_id: str) -> str | None:
        lease = self._live(session_id)
        return lease[0] if lease else None

    async def drop(self, session_id: str) -> None:
        self.leases.pop(session_id, None)


# -- router ------------------------------------------------------------------------------------


class FakeSessions:
    """The router's SessionsClient over a dict of pins, refusing other callers as sessions does."""

    def __init__(self) -> None:
        self.pins: dict[SessionRef, router_model.SessionPin] = {}
        # The version each session was created on, with its timeouts.
        self.created_on: dict[SessionRef, router_model.VersionInfo] = {}
        self.gets = 0

    def _owned(self, caller: Caller, session: SessionRef) -> router_model.SessionPin | None:
        pin = self.pins.get(session)
        if pin is not None and pin.owner != caller:
            raise PermissionDenied(f"{session.name} belongs to another caller")
        return pin

    async def get(self, caller: Caller, session: SessionRef) -> router_model.SessionPin | None:
        self.gets += 1
        return self._owned(caller, session)

    async def create(
        self, caller: Caller, session: SessionRef, version: router_model.VersionInfo,
        endpoint: EndpointRef | None,
    ) -> router_model.SessionPin | None:
        if session in self.pins:
            return None
        pin = router_model.SessionPin(
            session, caller, None, version.ref.parent, version.ref, version.digest, endpoint
        )
        self.pins[session] = pin
        self.created_on[session] = version
        return pin

    async def stop(self, caller: Caller, session: SessionRef) -> None:
        pin = self._owned(caller, session)
        if pin is None:
            raise NotFound(f"{session.name} not found")
        self.pins[session] = dataclasses.replace(pin, ended=router_model.SessionEnd.STOPPED)


class FakeRegistry:
    """The router's RegistryClient over a dict of published versions."""

    def __init__(self, *versions: router_model.VersionInfo) -> None:
        self.versions = {v.ref: v for v in versions}

    async def version(self, ref: VersionRef) -> router_model.VersionInfo:
        if ref not in self.versions:
            raise NotFound(f"{ref.name} does not exist")
        return self.versions[ref]


class FakeExecutor:
    """The router's ExecutorClient: each execution echoes its payload back in `chunks` pieces and
    counts the session's turns. `closed` lists the invocations whose streams were closed."""

    def __init__(self, chunks: int = 2) -> None:
        self.chunks = chunks
        self.invocations: list[router_model.Invocation] = []
        self.closed: list[str] = []
        self.stopped: list[SessionRef] = []
        self.turns: dict[SessionRef, int] = {}

    async def execute(
        self, caller: Caller, invocation: router_model.Invocation, trace: router_model.TraceContext
    ) -> AsyncGenerator[router_model.ExecutionEvent, None]:
        self.invocations.append(invocation)
        session = invocation.resolved.pin.session
        try:
            yield router_model.Started("trace-" + invocation.invocation_id)
            size = max(1, -(-len(invocation.payload) // self.chunks))
            for start in range(0, len(invocation.payload), size):
                yield router_model.Chunk(invocation.payload[start : start + size])
            self.turns[session] = self.turns.get(session, 0) + 1
            yield router_model.Completed(duration_ms=1, turn=self.turns[session])
        finally:
            self.closed.append(invocation.invocation_id)

    async def stop_session(self, caller: Caller, session: SessionRef) -> None:
        self.stopped.append(session)


class FakeEndpoints:
    """The registry's endpoints, as an EndpointMirror reads them: the watch sends one snapshot,
    `get` reads the dict."""

    def __init__(self, *endpoints: EndpointTraffic) -> None:
        self.endpoints = {e.ref: e for e in endpoints}

    async def watch(self) -> AsyncIterator[EndpointUpdate]:
        yield EndpointUpdate(tuple(self.endpoints.values()), snapshot=True)

    async def get(self, ref: EndpointRef) -> EndpointTraffic:
        if ref not in self.endpoints:
            raise NotFound(f"{ref.name} does not exist")
        return self.endpoints[ref]


# -- registry ----------------------------------------------------------------------------------


# -- executor ----------------------------------------------------------------------------------


# -- telemetry ---------------------------------------------------------------------------------
