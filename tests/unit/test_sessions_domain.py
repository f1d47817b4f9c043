"""The sessions domain with in-memory storage and a hand-driven clock: no sockets, no databases."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from services.common.errors import (
    Aborted,
    AlreadyExists,
    CorralError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.common.identity import Caller
from services.sessions.model import (
    NewSession,
    PageKey,
    SessionFilter,
    SessionRecord,
    SessionStatus,
    Turn,
)
from services.sessions.rules import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_LIFETIME_S,
    MAX_STATE_BYTES,
    check_state_size,
    decode_page_token,
    encode_page_token,
    lease_ttl,
    page_size,
    validate_new_session,
)
from services.sessions.sessions import Sessions

DIGEST = "sha256:" + "ab" * 32
SPEC = NewSession(agent="agents/demo", version="agents/demo/versions/1", version_digest=DIGEST)
ALICE = Caller("acme", "alice")
BOB = Caller("acme", "bob")
MALLORY = Caller("evil", "alice")
T0 = datetime(2030, 1, 1, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.time = T0

    def now(self) -> datetime:
        return self.time

    def advance(self, seconds: float) -> None:
        self.time += timedelta(seconds=seconds)


class SequentialIds:
    def __init__(self) -> None:
        self.n = 0

    def new_id(self) -> str:
        self.n += 1
        return f"id{self.n:04d}"


class MemoryStore:
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
        self, tenant: str, where: SessionFilter, after: PageKey | None, limit: int
    ) -> list[SessionRecord]:
        rows = sorted(
            (
                r
                for r in self.records.values()
                if r.tenant == tenant
                and (not where.agent or r.agent == where.agent)
                and (not where.version or r.version == where.version)
                and (where.status is None or r.status is where.status)
                and (after is None or (r.create_time, r.id) > after)
            ),
            key=lambda r: (r.create_time, r.id),
        )
        return rows[:limit]

    async def set_status(
        self, session_id: str, status: SessionStatus, now: datetime, only_from: SessionStatus
    ) -> SessionRecord | None:
        record = self.records.get(session_id)
        if record is None or record.status is not only_from:
            return None
        return self._put(dataclasses.replace(record, status=status, update_time=now))

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
        self,
        session_id: str,
        state: bytes,
        expected_etag: str,
        new_etag: str,
        now: datetime,
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


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def leases(clock: FakeClock) -> MemoryLeases:
    return MemoryLeases(clock)


@pytest.fixture
def sessions(store: MemoryStore, leases: MemoryLeases, clock: FakeClock) -> Sessions:
    return Sessions(store, leases, clock, SequentialIds())


def field_of(err: CorralError) -> str:
    assert err.violations, err
    return err.violations[0].field


@pytest.mark.parametrize("session_id", ["a b", "x" * 129, "a/b", "-leading", "é", "a*"])
def test_bad_session_ids_name_the_field(session_id: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_new_session(session_id, SPEC)
    assert field_of(info.value) == "session_id"


@pytest.mark.parametrize("session_id", ["", "a", "x" * 128, "conv-1_a.b:c", "A9"])
def test_good_session_ids_pass(session_id: str) -> None:
    validate_new_session(session_id, SPEC)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"agent": ""}, "session.agent"),
        ({"agent": "demo"}, "session.agent"),
        ({"version": ""}, "session.version"),
        ({"version": "agents/demo/versions/0"}, "session.version"),
        ({"version": "agents/demo/versions/latest"}, "session.version"),
        ({"version": "agents/other/versions/1"}, "session.version"),
        ({"version_digest": ""}, "session.version_digest"),
        ({"version_digest": "sha256:xyz"}, "session.version_digest"),
        ({"endpoint": "prod"}, "session.endpoint"),
        ({"endpoint": "agents/other/endpoints/prod"}, "session.endpoint"),
    ],
)
def test_bad_pins_name_the_field(change: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_new_session("", dataclasses.replace(SPEC, **change))
    assert field_of(info.value) == field


def test_page_token_round_trips_and_rejects_garbage() -> None:
    key = (T0 + timedelta(microseconds=123457), "conv:1")
    assert decode_page_token(encode_page_token(key)) == key
    for token in ("garbage!", "djE6eDph", encode_page_token(key)[:-3] + "%%%", "djI6MTphYmM"):
        with pytest.raises(InvalidArgument) as info:
            decode_page_token(token)
        assert field_of(info.value) == "page_token"


def test_page_size_defaults_caps_and_refuses_negative() -> None:
    assert page_size(0) == 50
    assert page_size(7) == 7
    assert page_size(5000) == 1000
    with pytest.raises(InvalidArgument):
        page_size(-1)


def test_lease_ttl_and_state_limits() -> None:
    assert lease_ttl(None) == 30
    assert lease_ttl(0.5) == 0.5
    with pytest.raises(InvalidArgument) as info:
        lease_ttl(3601)
    assert field_of(info.value) == "ttl"
    check_state_size(b"x" * MAX_STATE_BYTES)
    with pytest.raises(InvalidArgument) as info:
        check_state_size(b"x" * (MAX_STATE_BYTES + 1))
    assert field_of(info.value) == "state"
    assert str(MAX_STATE_BYTES) in info.value.message


async def test_create_applies_defaults_and_binds_the_caller(sessions: Sessions) -> None:
    record = await sessions.create(ALICE, "", SPEC)
    assert record.id == "id0001"
    assert (record.tenant, record.user) == ("acme", "alice")
    assert (record.idle_timeout_s, record.max_lifetime_s) == (
        DEFAULT_IDLE_TIMEOUT_S,
        DEFAULT_MAX_LIFETIME_S,
    )
    assert record.status is SessionStatus.ACTIVE and record.state_etag
    with pytest.raises(AlreadyExists, match="sessions/id0001"):
        await sessions.create(ALICE, "id0001", SPEC)
    with pytest.raises(InvalidArgument) as info:
        await sessions.create(ALICE, "x", dataclasses.replace(SPEC, idle_timeout_s=0.2))
    assert field_of(info.value) == "session.idle_timeout"


async def test_other_callers_are_refused_before_anything(sessions: Sessions) -> None:
    await sessions.create(ALICE, "s1", SPEC)
    for other in (BOB, MALLORY):
        with pytest.raises(PermissionDenied, match="sessions/s1 belongs to another caller"):
            await sessions.get(other, "sessions/s1")
        with pytest.raises(PermissionDenied):
            await sessions.acquire_lease(other, "sessions/s1", "x", None)
        with pytest.raises(PermissionDenied):
            await sessions.delete(other, "sessions/s1")
    with pytest.raises(NotFound, match="sessions/nope"):
        await sessions.get(ALICE, "sessions/nope")
    with pytest.raises(InvalidArgument) as info:
        await sessions.get(ALICE, "s1")
    assert field_of(info.value) == "name"


async def test_idle_and_lifetime_expiry_is_persisted_and_blocks_leases(
    sessions: Sessions, store: MemoryStore, clock: FakeClock
) -> None:
    await sessions.create(ALICE, "idle", dataclasses.replace(SPEC, idle_timeout_s=10))
    await sessions.create(ALICE, "old", dataclasses.replace(SPEC, max_lifetime_s=20))
    clock.advance(9)
    lease = await sessions.acquire_lease(ALICE, "sessions/old", "h", None)
    assert lease.state is not None
    await sessions.commit_turn(
        ALICE, "sessions/old", lease.lease_id, lease.state.etag, b"s", Turn("i", b"", b"")
    )
    assert (await sessions.get(ALICE, "sessions/idle")).status is SessionStatus.ACTIVE
    clock.advance(2)
    assert (await sessions.get(ALICE, "sessions/idle")).status is SessionStatus.EXPIRED
    assert store.records["idle"].status is SessionStatus.EXPIRED
    # Activity keeps "old" from going idle, but not past its max lifetime.
    assert (await sessions.get(ALICE, "sessions/old")).status is SessionStatus.ACTIVE
    clock.advance(10)
    page = await sessions.list(ALICE, SessionFilter(status=SessionStatus.EXPIRED), 0, "")
    assert [r.id for r in page.sessions] == ["idle", "old"]
    with pytest.raises(FailedPrecondition, match="expired") as info:
        await sessions.acquire_lease(ALICE, "sessions/old", "h", None)
    assert info.value.reason == "SESSION_EXPIRED"


async def test_stop_is_idempotent_and_refuses_new_leases(sessions: Sessions) -> None:
    await sessions.create(ALICE, "s", SPEC)
    assert (await sessions.stop(ALICE, "sessions/s")).status is SessionStatus.STOPPED
    assert (await sessions.stop(ALICE, "sessions/s")).status is SessionStatus.STOPPED
    with pytest.raises(FailedPrecondition, match="stopped"):
        await sessions.acquire_lease(ALICE, "sessions/s", "h", None)


async def test_lease_is_exclusive_until_released_or_expired(
    sessions: Sessions, clock: FakeClock
) -> None:
    await sessions.create(ALICE, "s", SPEC)
    first = await sessions.acquire_lease(ALICE, "sessions/s", "exec-a", 5)
    assert first.state is not None and first.state.turn_count == 0
    with pytest.raises(Aborted, match="session sessions/s is busy") as info:
        await sessions.acquire_lease(ALICE, "sessions/s", "exec-b", 5)
    assert info.value.reason == "SESSION_BUSY"
    assert (await sessions.renew_lease(ALICE, "sessions/s", first.lease_id, 5)).holder == "exec-a"
    await sessions.release_lease(ALICE, "sessions/s", "someone-else")  # not ours: no-op
    with pytest.raises(Aborted):
        await sessions.acquire_lease(ALICE, "sessions/s", "exec-b", 5)
    clock.advance(6)
    with pytest.raises(Aborted) as info:
        await sessions.renew_lease(ALICE, "sessions/s", first.lease_id, 5)
    assert info.value.reason == "LEASE_LOST"
    second = await sessions.acquire_lease(ALICE, "sessions/s", "exec-b", 5)
    await sessions.release_lease(ALICE, "sessions/s", second.lease_id)
    await sessions.release_lease(ALICE, "sessions/s", second.lease_id)  # idempotent


async def test_commit_turn_is_compare_and_set(sessions: Sessions, store: MemoryStore) -> None:
    await sessions.create(ALICE, "s", SPEC)
    lease = await sessions.acquire_lease(ALICE, "sessions/s", "h", None)
    assert lease.state is not None
    saved = await sessions.commit_turn(
        ALICE,
        "sessions/s",
        lease.lease_id,
        lease.state.etag,
        b'{"n":1}',
        Turn("inv1", b"hi", b"yo"),
    )
    assert saved.turn_count == 1 and saved.etag != lease.state.etag
    with pytest.raises(Aborted, match="re-read") as info:
        await sessions.commit_turn(
            ALICE, "sessions/s", lease.lease_id, lease.state.etag, b"stale", Turn("inv2", b"", b"")
        )
    assert info.value.reason == "STATE_CONFLICT"
    assert store.states["s"] == b'{"n":1}' and store.records["s"].turn_count == 1
    assert [(seq, t.invocation_id) for seq, t in store.events["s"]] == [(1, "inv1")]
    await sessions.release_lease(ALICE, "sessions/s", lease.lease_id)
    with pytest.raises(Aborted) as info:
        await sessions.commit_turn(
            ALICE, "sessions/s", lease.lease_id, saved.etag, b"x", Turn("i", b"", b"")
        )
    assert info.value.reason == "LEASE_LOST"
    assert store.states["s"] == b'{"n":1}'


async def test_update_state_needs_the_current_etag(sessions: Sessions) -> None:
    record = await sessions.create(ALICE, "s", SPEC)
    with pytest.raises(InvalidArgument):
        await sessions.update_state(ALICE, "sessions/s", b"x", "")
    updated = await sessions.update_state(ALICE, "sessions/s", b"x", record.state_etag)
    assert updated.turn_count == 0
    with pytest.raises(Aborted):
        await sessions.update_state(ALICE, "sessions/s", b"y", record.state_etag)
    assert (await sessions.get_state(ALICE, "sessions/s")).state == b"x"


async def test_list_pages_within_the_tenant(sessions: Sessions, clock: FakeClock) -> None:
    for i in range(7):
        await sessions.create(ALICE if i % 2 == 0 else BOB, f"s{i}", SPEC)
        if i % 3 == 0:
            clock.advance(1)  # some share a create_time: the id breaks the tie
    await sessions.create(MALLORY, "theirs", SPEC)
    seen: list[str] = []
    token = ""
    while True:
        page = await sessions.list(ALICE, SessionFilter(), 3, token)
        assert len(page.sessions) <= 3
        seen += [r.id for r in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"s{i}" for i in range(7)]
    assert (await sessions.list(MALLORY, SessionFilter(), 0, "")).sessions[0].id == "theirs"
    with pytest.raises(InvalidArgument) as info:
        await sessions.list(ALICE, SessionFilter(version="agents/demo"), 0, "")
    assert field_of(info.value) == "version"


async def test_delete_removes_the_lease_too(sessions: Sessions, leases: MemoryLeases) -> None:
    await sessions.create(ALICE, "s", SPEC)
    await sessions.acquire_lease(ALICE, "sessions/s", "h", None)
    await sessions.delete(ALICE, "sessions/s")
    assert "s" not in leases.leases
    with pytest.raises(NotFound):
        await sessions.get_state(ALICE, "sessions/s")
