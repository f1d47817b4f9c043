"""Redis through redis.asyncio, with every key under one prefix, over a pool sized from settings."""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import MaxConnectionsError

from services.common.settings import StorePools


class RedisPoolExhausted(MaxConnectionsError):
    """Every connection of the pool stayed busy for as long as a call may wait for one."""

    def __init__(self, max_connections: int, waited_s: float) -> None:
        super().__init__(
            f"all {max_connections} connections of the pool stayed busy for {waited_s:g} s"
        )
        self.max_connections = max_connections
        self.waited_s = waited_s


class BoundedRedisPool(redis.BlockingConnectionPool):
    """A call waits up to `timeout` for a free connection, then fails as RedisPoolExhausted rather
    than redis-py's ConnectionError, which reads as Redis being down."""

    async def get_connection(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().get_connection(*args, **options)  # type: ignore[no-untyped-call]
        except redis.ConnectionError as exc:
            if isinstance(exc.__cause__, TimeoutError):
                raise RedisPoolExhausted(self.max_connections, self.timeout or 0) from exc
            raise


def create_redis(url: str, pools: StorePools | None = None) -> redis.Redis:
    pools = pools or StorePools()
    pool = BoundedRedisPool.from_url(
        url,
        max_connections=pools.redis_max,
        timeout=pools.wait_s,
        socket_connect_timeout=pools.wait_s,
        socket_timeout=pools.wait_s,
        health_check_interval=30,
        # One retry, soon: a pooled connection Redis closed while restarting fails once and is
        # replaced; a Redis that stays down is the caller's to retry (UNAVAILABLE).
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
    )
    # from_pool: closing the client closes the pool too.
    return redis.Redis.from_pool(pool)


class KeySpace:
    """Builds prefixed keys so deployments and test runs can share one Redis."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)
