"""The executor's one store, Redis, shared by every executor of the fleet: the deny-list of revoked
invocation credentials (so any of them can answer a tool service's revocation check) and the
public keys of them all (so any of them can serve the whole fleet's JWKS)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.errors import Unavailable


class RedisRevocations:
    """One key per revoked jti, expiring with the token it revokes."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    def _key(self, jti: str) -> str:
        return f"{self._prefix}revoked:{jti}"

    async def add(self, jti: str, ttl_s: int) -> None:
        await self._redis.set(self._key(jti), b"1", ex=ttl_s)

    async def contains(self, jti: str) -> bool:
        try:
            return bool(await self._redis.exists(self._key(jti)))
        except (RedisError, OSError) as exc:
            raise Unavailable(
                f"the revocation list is unavailable ({exc}); retry", reason="REVOCATIONS_UNAVAILABLE"
            ) from None


class RedisJwks:
    """The fleet's public keys: one sorted set, each JWK (as canonical JSON) scored by the time
    until which it is kept."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._key = f"{prefix}jwks"

    async def publish(self, keys: Sequence[dict[str, str]], *, until: float, now: float) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(self._key, "-inf", now)
                if keys:
                    pipe.zadd(self._key, {json.dumps(k, sort_keys=True): until for k in keys})
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise Unavailable(
                f"the fleet's keys are unavailable ({exc}); retry", reason="JWKS_UNAVAILABLE"
            ) from None

    async def read(self, *, now: float) -> list[dict[str, str]]:
        try:
            members = await self._redis.zrangebyscore(self._key, now, "+inf")
        except (RedisError, OSError) as exc:
            raise Unavailable(
                f"the fleet's keys are unavailable ({exc}); retry", reason="JWKS_UNAVAILABLE"
            ) from None
        return [json.loads(m) for m in members if isinstance(m, (bytes, str))]
