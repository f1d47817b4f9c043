"""The sessions service's seams in memory: its SessionStore, LeaseStore and TurnResultStore."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from corral.names import EndpointRef, VersionRef
from services.common.paging import Key
from services.sessions.model import (
    PinnedSessions,
    PinnedVersion,
    RequestAlreadyRecorded,
    SessionFilter,
    SessionKey,
    SessionRecord,
    SessionStatus,
    Turn,
    TurnResult,
)
from tests.fakes.common import FakeClock, keyset_page


class MemoryStore:
    """The sessions SessionStore in dicts: records, their states and their turns' events."""

    def __init__(self) -> None:
        self.records: dict[SessionKey, SessionRecord] = {}
        self.states: dict[SessionKey, bytes] = {}
        self.events: dict[SessionKey, list[tuple[int, Turn]]] = {}
        # The results of turns committed under request ids, as the commit records them.
        self.results: dict[tuple[SessionKey, str], TurnResult] = {}

    async def insert(self, record: SessionRecord) -> SessionRecord | None:
        if record.key in self.records:
            return None
        self.records[record.key], self.states[record.key] = record, b""
        self.events[record.key] = []
        return record

    async def get(self, session_id: SessionKey) -> SessionRecord | None:
        return self.records.get(session_id)

    async def get_state(self, session_id: SessionKey) -> tuple[SessionRecord, bytes] | None:
        if session_id not in self.records:
            return None
        return self.records[session_id], self.states[session_id]

    async def list(
        self, tenant: str | None, where: SessionFilter, after: Key | None, limit: int
    ) -> list[SessionRecord]:
        def kept(r: SessionRecord) -> bool:
            return (
                tenant in (None, r.tenant)
                and (where.agent is None or r.agent == where.agent.name)
                and (where.version is None or r.version == where.version.name)
                and (where.status is None or r.status is where.status)
            )

        def key(r: SessionRecord) -> tuple[datetime, str]:
            return r.create_time, r.id

        return keyset_page([r for r in self.records.values() if kept(r)], key, after, limit,
                           newest_first=True)

    async def set_status(
        self, session_id: SessionKey, status: SessionStatus, now: datetime, only_from: SessionStatus
    ) -> SessionRecord | None:
        record = self.records.get(session_id)
        if record is None or record.status is not only_from:
            return None
        return self._put(dataclasses.replace(record, status=status, update_time=now))

    async def retire_version(
        self, tenant: str | None, version: VersionRef, endpoint: EndpointRef | None,
        now: datetime, to: PinnedVersion | None,
    ) -> int:
        due = [
            r
            for r in self.records.values()
            if r.version == version.name
            and tenant in (None, r.tenant)
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

    async def expire_due(self, tenant: str | None, now: datetime) -> int:
        due = [r for r in self.records.values() if tenant in (None, r.tenant) and r.is_expired(now)]
        for r in due:
            self._put(dataclasses.replace(r, status=SessionStatus.EXPIRED, update_time=now))
        return len(due)

    async def touch(self, session_id: SessionKey, now: datetime) -> SessionRecord | None:
        record = self.records.get(session_id)
        return (
            None if record is None else self._put(dataclasses.replace(record, last_active_time=now))
        )

    async def touch_and_load(
        self, session_id: SessionKey, now: datetime
    ) -> tuple[SessionRecord, bytes] | None:
        record = await self.touch(session_id, now)
        return None if record is None else (record, self.states.get(session_id, b""))

    async def write_state(
        self, session_id: SessionKey, state: bytes, expected_etag: str, new_etag: str, now: datetime,
        turn: Turn | None,
    ) -> SessionRecord | None:
        record = self.records.get(session_id)
        if record is None or record.state_etag != expected_etag:
            return None
        request = turn.request if turn else None
        if request is not None and (session_id, request.request_id) in self.results:
            raise RequestAlreadyRecorded()
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
        if turn and request:
            self.results[session_id, request.request_id] = TurnResult(
                turn=record.turn_count, output=turn.output, content_type=request.content_type,
                version=record.version, invocation_id=turn.invocation_id,
                trace_id=request.trace_id, commit_time=now, digest=request.digest,
            )
        return self._put(record)

    async def delete(self, session_id: SessionKey) -> bool:
        self.states.pop(session_id, None)
        self.events.pop(session_id, None)
        return self.records.pop(session_id, None) is not None

    async def pinned(self, tenant: str, versions: list[VersionRef]) -> list[PinnedSessions]:
        names = {v.name for v in versions}
        mine = [r for r in self.records.values() if r.tenant == tenant and r.version in names]
        return [
            PinnedSessions(
                name,
                sum(r.status is SessionStatus.ACTIVE for r in mine if r.version == name),
                max(r.last_active_time for r in mine if r.version == name),
            )
            for name in sorted({r.version for r in mine})
        ]

    def _put(self, record: SessionRecord) -> SessionRecord:
        self.records[record.key] = record
        return record


class MemoryLeases:
    """The sessions LeaseStore in a dict; a lease expires by the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.leases: dict[SessionKey, tuple[str, str, datetime]] = {}

    def _live(self, session_id: SessionKey) -> tuple[str, str, datetime] | None:
        lease = self.leases.get(session_id)
        if lease and lease[2] <= self.clock.now():
            del self.leases[session_id]
            return None
        return lease

    async def acquire(self, session_id: SessionKey, lease_id: str, holder: str, ttl_s: float) -> bool:
        if self._live(session_id):
            return False
        self.leases[session_id] = (lease_id, holder, self.clock.now() + timedelta(seconds=ttl_s))
        return True

    async def renew(self, session_id: SessionKey, lease_id: str, ttl_s: float) -> str | None:
        lease = self._live(session_id)
        if not lease or lease[0] != lease_id:
            return None
        self.leases[session_id] = (lease_id, lease[1], self.clock.now() + timedelta(seconds=ttl_s))
        return lease[1]

    async def release(self, session_id: SessionKey, lease_id: str) -> bool:
        lease = self._live(session_id)
        if not lease or lease[0] != lease_id:
            return False
        del self.leases[session_id]
        return True

    async def holder(self, session_id: SessionKey) -> str | None:
        lease = self._live(session_id)
        return lease[0] if lease else None

    async def drop(self, session_id: SessionKey) -> None:
        self.leases.pop(session_id, None)


class MemoryTurnResults:
    """The TurnResultStore over a MemoryStore's recorded results."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store

    async def get(self, session: SessionKey, request_id: str, since: datetime) -> TurnResult | None:
        found = self._store.results.get((session, request_id))
        return found if found is not None and found.commit_time >= since else None

    async def delete_before(self, cutoff: datetime) -> int:
        old = [k for k, r in self._store.results.items() if r.commit_time < cutoff]
        for k in old:
            del self._store.results[k]
        return len(old)
