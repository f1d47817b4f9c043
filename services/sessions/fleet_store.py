"""The executor fleet's membership in Redis, the only module that speaks to it for the fleet: one
key per live executor (its last heartbeat, expiring with a TTL), a sorted set of the names seen
(to list them), and a set of drained names (no TTL: a drain outlives heartbeats and restarts)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import cast

import redis.asyncio as redis

from services.common.kv import KeySpace
from services.sessions.fleet_model import ExecutorMember

# A name not seen for this long is dropped from the sorted set of names.
FORGET_AFTER_MS = 3_600_000


def _to_json(member: ExecutorMember) -> str:
    return json.dumps({
        "name": member.name, "address": member.address, "instance_id": member.instance_id,
        "driver": member.driver, "capacity": member.capacity, "in_use": member.in_use,
        "warm_versions": list(member.warm_versions), "start_time": member.start_time.isoformat(),
        "heartbeat_time": member.heartbeat_time.isoformat(),
    })


def _from_json(data: bytes | str, draining: bool) -> ExecutorMember | None:
    try:
        v = json.loads(data)
        return ExecutorMember(
            name=v["name"], address=v["address"], instance_id=v["instance_id"],
            driver=v["driver"], capacity=int(v["capacity"]), in_use=int(v["in_use"]),
            warm_versions=tuple(v["warm_versions"]),
            start_time=datetime.fromisoformat(v["start_time"]),
            heartbeat_time=datetime.fromisoformat(v["heartbeat_time"]), draining=draining,
        )
    except (ValueError, KeyError, TypeError):
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisFleet:
    """Implements FleetStore."""

    def __init__(self, client: redis.Redis, keys: KeySpace) -> None:
        self._redis = client
        self._keys = keys

    def _member_key(self, name: str) -> str:
        return self._keys("fleet", "member", name)

    @property
    def _names(self) -> str:
        return self._keys("fleet", "names")

    @property
    def _drained(self) -> str:
        return self._keys("fleet", "drained")

    async def beat(self, member: ExecutorMember, ttl_s: float) -> bool:
        now_ms = int(member.heartbeat_time.timestamp() * 1000)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._member_key(member.name), _to_json(member), px=max(1, round(ttl_s * 1000)))
            pipe.zadd(self._names, {member.name: now_ms})
            pipe.zremrangebyscore(self._names, "-inf", now_ms - FORGET_AFTER_MS)
            pipe.sismember(self._drained, member.name)
            *_, drained = await pipe.execute()
        return bool(drained)

    async def members(self) -> Sequence[ExecutorMember]:
        names = [_text(cast(bytes | str, n)) for n in await self._redis.zrange(self._names, 0, -1)]
        if not names:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.mget([self._member_key(n) for n in names])
            pipe.smembers(self._drained)
            values, drained = await pipe.execute()
        drained_names = {_text(d) for d in drained}
        found = [
            _from_json(v, name in drained_names)
            for name, v in zip(names, values, strict=True) if v is not None
        ]
        return sorted((m for m in found if m is not None), key=lambda m: m.name)

    async def member(self, name: str) -> ExecutorMember | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self._member_key(name))
            pipe.sismember(self._drained, name)
            value, drained = await pipe.execute()
        return None if value is None else _from_json(value, bool(drained))

    async def set_drained(self, name: str, drained: bool) -> None:
        if drained:
            await self._redis.sadd(self._drained, name)
        else:
            await self._redis.srem(self._drained, name)

    async def is_drained(self, name: str) -> bool:
        return bool(await self._redis.sismember(self._drained, name))
