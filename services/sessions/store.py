"""The sessions service's storage, the only module that speaks SQL or Redis: session records and
turns in PostgreSQL (the record), leases and a read cache of records in Redis (disposable)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

import asyncpg
import redis.asyncio as redis
from redis.commands.core import AsyncScript

from corral.names import EndpointRef, VersionRef
from services.common.db import from_row
from services.common.kv import KeySpace
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
    TurnRequest,
)

log = logging.getLogger(__name__)

# Bounds how long a copy could outlive a write whose invalidation was lost (Redis down at the time).
CACHE_TTL_MS = 60_000

_COLUMNS = """id, agent, version, version_digest, endpoint, tenant, user_id, status,
    turn_count, state_etag, create_time, update_time, last_active_time, idle_timeout_s,
    max_lifetime_s, revision, executor"""
_NEXT_REVISION = "nextval('sessions.revision_seq')"
# A session is found by its tenant ($1) and its id ($2).
_KEY = "tenant = $1 AND id = $2"
# The record's times, which its cached copy holds in ISO 8601.
_TIMES = ("create_time", "update_time", "last_active_time")
# A session row: as asyncpg returns it, or its columns picked out of a wider row.
Row = asyncpg.Record | Mapping[str, Any]

# Replaces the cached copy only with a newer revision, so a slow reader cannot put back a record
# older than the one a writer just stored (or resurrect a deleted one: see RecordCache.forget).
# ARGV[4] = '1' for a tombstone, which also replaces a copy of the same revision.
_CACHE_PUT = """
local current = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
local rev = tonumber(ARGV[1])
if rev > current or (ARGV[4] == '1' and rev == current) then
  redis.call('HSET', KEYS[1], 'rev', ARGV[1], 'data', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""
# A lease's value is "<lease_id>\n<holder>"; ARGV[1] is "<lease_id>\n".
_LEASE_RENEW = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return v
end
return false
"""
# Takes a lease over from the lease id in ARGV[1] ("<lease_id>\n"): only if it still holds it.
_LEASE_TAKE_OVER = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
_LEASE_RELEASE = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _record(row: Row) -> SessionRecord:
    """The record in a row: its columns by the fields' names, but for user_id and the status."""
    return from_row(SessionRecord, row, user=row["user_id"], status=SessionStatus(row["status"]))


def _row(record: SessionRecord) -> dict[str, object]:
    """The record as the table's columns, by name."""
    values = dataclasses.asdict(record)
    values["user_id"] = values.pop("user")
    values["status"] = record.status.value
    return values


def _to_json(row: Row) -> str:
    values = dict(row.items())
    for key in _TIMES:
        values[key] = values[key].isoformat()
    return json.dumps(values)


def _from_json(data: bytes | str) -> SessionRecord:
    values = json.loads(data)
    for key in _TIMES:
        values[key] = datetime.fromisoformat(values[key])
    return _record(values)


class _PerSession:
    """What the record cache and the leases share: one Redis key per session for their `kind`,
    and their Lua scripts, registered with the client once each."""

    kind: ClassVar[str]

    def __init__(self, client: redis.Redis, keys: KeySpace) -> None:
        self._redis = client
        self._keys = keys
        self._scripts: dict[str, AsyncScript] = {}

    def _key(self, session: SessionKey) -> str:
        # '/' is in neither a tenant nor a session id, so no two sessions share a key.
        return self._keys("sessions", self.kind, f"{session.tenant}/{session.id}")

    def _script(self, source: str) -> AsyncScript:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self._redis.register_script(source)
        return script


class RecordCache(_PerSession):
    """Hot copies of session records (never their state). Redis failures only cost a cache miss."""

    kind = "record"

    async def get(self, session: SessionKey) -> SessionRecord | None:
        try:
            data = await self._redis.hget(self._key(session), "data")
        except (redis.RedisError, OSError) as exc:
            log.warning("session cache read failed, reading PostgreSQL: %s", exc)
            return None
        if not data:
            return None
        try:
            return _from_json(data)
        except (ValueError, KeyError, TypeError):
            log.warning("dropping an unreadable cached copy of %s", session)
            return None

    async def put(self, row: Row) -> None:
        key = SessionKey(row["tenant"], row["id"])
        await self._store(key, row["revision"], _to_json(row), tombstone=False)

    async def forget(self, session: SessionKey, revision: int) -> None:
        # A tombstone at the deleted row's revision: an older copy read before the delete can no
        # longer be cached, while a session re-created under that id (a later revision) can.
        await self._store(session, revision, "", tombstone=True)

    async def _store(
        self, session: SessionKey, revision: int, data: str, *, tombstone: bool
    ) -> None:
        try:
            await self._script(_CACHE_PUT)(
                keys=[self._key(session)],
                args=[revision, data, CACHE_TTL_MS, "1" if tombstone else "0"],
            )
        except (redis.RedisError, OSError) as exc:
            log.warning("session cache update for %s failed: %s", session, exc)


class PgSessionStore:
    """Sessions and their turns in PostgreSQL, with the record cache kept in step on every write."""

    def __init__(self, pool: asyncpg.Pool, cache: RecordCache) -> None:
        self._pool = pool
        self._cache = cache

    async def insert(self, record: SessionRecord) -> SessionRecord | None:
        values = _row(record)
        row = await self._pool.fetchrow(
            f"""INSERT INTO sessions.sessions ({", ".join(values)})
                VALUES ({", ".join(f"${n}" for n in range(1, len(values) + 1))})
                ON CONFLICT (tenant, id) DO NOTHING
                RETURNING {_COLUMNS}""",
            *values.values(),
        )
        return await self._cached(row)

    async def get(self, session: SessionKey) -> SessionRecord | None:
        hit = await self._cache.get(session)
        if hit is not None:
            return hit
        row = await self._pool.fetchrow(
            f"SELECT {_COLUMNS} FROM sessions.sessions WHERE {_KEY}", session.tenant, session.id
        )
        return await self._cached(row)

    async def get_state(self, session: SessionKey) -> tuple[SessionRecord, bytes] | None:
        row = await self._pool.fetchrow(
            f"SELECT {_COLUMNS}, state FROM sessions.sessions WHERE {_KEY}",
            session.tenant, session.id,
        )
        if row is None:
            return None
        return _record(row), bytes(row["state"])

    async def list(
        self, tenant: str | None, where: SessionFilter, after: Key | None, limit: int
    ) -> list[SessionRecord]:
        conditions: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if tenant is not None:
            conditions.append(f"tenant = {arg(tenant)}")
        if where.agent is not None:
            conditions.append(f"agent = {arg(where.agent.name)}")
        if where.version is not None:
            conditions.append(f"version = {arg(where.version.name)}")
        if where.status is not None:
            conditions.append(f"status = {arg(where.status.value)}")
        if after is not None:
            conditions.append(
                f"(create_time, id) < ({arg(after[0])}::timestamptz, {arg(after[1])}::text)"
            )
        rows = await self._pool.fetch(
            f"""SELECT {_COLUMNS} FROM sessions.sessions
                WHERE {" AND ".join(conditions) or "true"}
                ORDER BY create_time DESC, id DESC LIMIT {arg(limit)}""",
            *args,
        )
        return [_record(r) for r in rows]

    async def set_status(
        self, session: SessionKey, status: SessionStatus, now: datetime, only_from: SessionStatus
    ) -> SessionRecord | None:
        row = await self._pool.fetchrow(
            f"""UPDATE sessions.sessions
                SET status = $3, update_time = $4, revision = {_NEXT_REVISION}
                WHERE {_KEY} AND status = $5
                RETURNING {_COLUMNS}""",
            session.tenant,
            session.id,
            status.value,
            now,
            only_from.value,
        )
        return await self._cached(row)

    async def retire_version(
        self, tenant: str | None, version: VersionRef, endpoint: EndpointRef | None,
        now: datetime, to: PinnedVersion | None,
    ) -> int:
        """Re-pins (or, with nowhere to go, stops) every active session on `version` (of
        `tenant`, or of every tenant for None)."""
        if to is not None:
            change, args = "version = $5, version_digest = $6", [to.version.name, to.digest]
        else:
            change, args = "status = $5", [SessionStatus.STOPPED.value]
        rows = await self._pool.fetch(
            f"""UPDATE sessions.sessions
                SET {change}, update_time = $3, revision = {_NEXT_REVISION}
                WHERE version = $1 AND ($2 = '' OR endpoint = $2) AND status = 'ACTIVE'
                  AND ($4::text IS NULL OR tenant = $4)
                RETURNING {_COLUMNS}""",
            version.name,
            endpoint.name if endpoint is not None else "",
            now,
            tenant,
            *args,
        )
        for row in rows:
            await self._cache.put(row)
        return len(rows)

    async def expire_due(self, tenant: str | None, now: datetime) -> int:
        # The same rule as SessionRecord.is_expired, applied to every live session of the tenant.
        rows = await self._pool.fetch(
            f"""UPDATE sessions.sessions
                SET status = 'EXPIRED', update_time = $2, revision = {_NEXT_REVISION}
                WHERE ($1::text IS NULL OR tenant = $1) AND status = 'ACTIVE'
                  AND (last_active_time + make_interval(secs => idle_timeout_s) < $2
                       OR create_time + make_interval(secs => max_lifetime_s) < $2)
                RETURNING {_COLUMNS}""",
            tenant,
            now,
        )
        for row in rows:
            await self._cache.put(row)
        return len(rows)

    async def touch(self, session: SessionKey, now: datetime) -> SessionRecord | None:
        row = await self._pool.fetchrow(
            f"""UPDATE sessions.sessions
                SET last_active_time = GREATEST(last_active_time, $3), revision = {_NEXT_REVISION}
                WHERE {_KEY}
                RETURNING {_COLUMNS}""",
            session.tenant,
            session.id,
            now,
        )
        return await self._cached(row)

    async def touch_and_load(
        self, session: SessionKey, now: datetime
    ) -> tuple[SessionRecord, bytes] | None:
        """touch(), returning the committed state too: a lease's first read in one statement."""
        row = await self._pool.fetchrow(
            f"""UPDATE sessions.sessions
                SET last_active_time = GREATEST(last_active_time, $3), revision = {_NEXT_REVISION}
                WHERE {_KEY}
                RETURNING {_COLUMNS}, state""",
            session.tenant,
            session.id,
            now,
        )
        if row is None:
            return None
        columns = {key: value for key, value in row.items() if key != "state"}
        await self._cache.put(columns)
        return _record(columns), bytes(row["state"])

    async def write_state(
        self, session: SessionKey, state: bytes, *, expected_etag: str, new_etag: str,
        now: datetime, turn: Turn | None,
    ) -> SessionRecord | None:
        # One statement, so one round trip: the compare-and-set on the etag, the turn's event and
        # its request id's result commit together or not at all.
        request = turn.request if turn else None
        try:
            row = await self._write_state(session, state, expected_etag, new_etag, now, turn, request)
        except asyncpg.UniqueViolationError as exc:
            if exc.table_name != "turn_requests":
                raise
            raise RequestAlreadyRecorded() from None
        # Only after the commit: a cached copy must never show a write that was rolled back.
        return await self._cached(row)

    async def _write_state(
        self, session: SessionKey, state: bytes, expected_etag: str, new_etag: str, now: datetime,
        turn: Turn | None, request: TurnRequest | None,
    ) -> asyncpg.Record | None:
        return await self._pool.fetchrow(
            f"""WITH updated AS (
                    UPDATE sessions.sessions
                    SET state = $3, state_etag = $4, update_time = $5,
                        turn_count = turn_count + $6,
                        last_active_time = CASE WHEN $6 > 0 THEN $5 ELSE last_active_time END,
                        revision = {_NEXT_REVISION}
                    WHERE {_KEY} AND state_etag = $7
                    RETURNING *),
                event AS (
                    INSERT INTO sessions.session_events
                        (tenant, session_id, seq, invocation_id, input, output, create_time)
                    SELECT tenant, id, turn_count, $8, $9, $10, $5 FROM updated WHERE $6 > 0),
                result AS (
                    INSERT INTO sessions.turn_requests
                        (tenant, session_id, request_id, request_digest, turn, version,
                         invocation_id, trace_id, content_type, output, commit_time)
                    SELECT tenant, id, $11, $12, turn_count, version, $8, $13, $14, $10, $5
                    FROM updated WHERE $11 <> '')
                SELECT {_COLUMNS} FROM updated""",
            session.tenant,
            session.id,
            state,
            new_etag,
            now,
            1 if turn else 0,
            expected_etag,
            turn.invocation_id if turn else "",
            turn.input if turn else b"",
            turn.output if turn else b"",
            request.request_id if request else "",
            request.digest if request else "",
            request.trace_id if request else "",
            request.content_type if request else "",
        )

    async def delete(self, session: SessionKey) -> bool:
        revision = await self._pool.fetchval(
            f"DELETE FROM sessions.sessions WHERE {_KEY} RETURNING revision",
            session.tenant, session.id,
        )
        if revision is None:
            return False
        await self._cache.forget(session, revision)
        return True

    async def place(
        self, session: SessionKey, executor: str, expected: str
    ) -> SessionRecord | None:
        row = await self._pool.fetchrow(
            f"""UPDATE sessions.sessions SET executor = $3, revision = {_NEXT_REVISION}
                WHERE {_KEY} AND executor = $4
                RETURNING {_COLUMNS}""",
            session.tenant, session.id, executor, expected,
        )
        return await self._cached(row)

    async def pinned(self, tenant: str, versions: Sequence[VersionRef]) -> Sequence[PinnedSessions]:
        rows = await self._pool.fetch(
            """SELECT version, count(*) FILTER (WHERE status = 'ACTIVE') AS active,
                      max(last_active_time) AS last_active
               FROM sessions.sessions WHERE tenant = $1 AND version = ANY($2::text[])
               GROUP BY version""",
            tenant, [v.name for v in versions],
        )
        return [PinnedSessions(r["version"], r["active"], r["last_active"]) for r in rows]

    async def _cached(self, row: asyncpg.Record | None) -> SessionRecord | None:
        if row is None:
            return None
        await self._cache.put(row)
        return _record(row)


class RedisLeases(_PerSession):
    """One lease per session: a key set with NX and a TTL, changed only by its holder's lease id.
    Leases exist only in Redis, so without it no invocation can safely start: its failures reach
    the caller (UNAVAILABLE, or RESOURCE_EXHAUSTED for a busy pool; services/common/
    store_errors.py), who retries."""

    kind = "lease"

    async def acquire(self, session: SessionKey, lease_id: str, holder: str, ttl_s: float) -> bool:
        taken = await self._redis.set(
            self._key(session), f"{lease_id}\n{holder}", nx=True, px=_ms(ttl_s)
        )
        return bool(taken)

    async def renew(self, session: SessionKey, lease_id: str, ttl_s: float) -> str | None:
        value = await self._script(_LEASE_RENEW)(
            keys=[self._key(session)], args=[f"{lease_id}\n", _ms(ttl_s)]
        )
        if not value:
            return None
        return _text(value).split("\n", 1)[1]

    async def release(self, session: SessionKey, lease_id: str) -> bool:
        removed = await self._script(_LEASE_RELEASE)(
            keys=[self._key(session)], args=[f"{lease_id}\n"]
        )
        return bool(removed)

    async def holder(self, session: SessionKey) -> str | None:
        value = await self._redis.get(self._key(session))
        if value is None:
            return None
        return _text(value).split("\n", 1)[0]

    async def current(self, session: SessionKey) -> tuple[str, str] | None:
        value = await self._redis.get(self._key(session))
        if value is None:
            return None
        lease_id, _, holder = _text(value).partition("\n")
        return lease_id, holder

    async def take_over(
        self, session: SessionKey, old_lease_id: str, lease_id: str, holder: str, ttl_s: float
    ) -> bool:
        taken = await self._script(_LEASE_TAKE_OVER)(
            keys=[self._key(session)],
            args=[f"{old_lease_id}\n", f"{lease_id}\n{holder}", _ms(ttl_s)],
        )
        return bool(taken)

    async def drop(self, session: SessionKey) -> None:
        await self._redis.delete(self._key(session))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))

