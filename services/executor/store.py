"""The executor's one store: the deny-list of revoked invocation credentials, in Redis (shared by
every executor replica, so any of them can answer a tool service's revocation check)."""

from __future__ import annotations

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
