"""What a failure of PostgreSQL or Redis means to the caller: the one place that turns the drivers'
exceptions into domain errors. The host's error mapping asks it about every exception a handler
raises, so no store, domain or servicer catches a driver's exception to say the same."""

from __future__ import annotations

import asyncpg
import redis.exceptions

from services.common.db import DatabasePoolExhausted, DatabaseUnreachable
from services.common.errors import CorralError, ResourceExhausted, Unavailable

# How long a caller is asked to wait (google.rpc.RetryInfo) before retrying.
UNAVAILABLE_RETRY_S = 2.0
EXHAUSTED_RETRY_S = 1.0
# How much of the driver's own words the message repeats.
_CAUSE_CHARS = 80

# asyncpg's exceptions that say no connection could be made (refused, or the server is shutting
# down or starting up): the call did nothing.
_DATABASE_NOT_REACHED: tuple[type[Exception], ...] = (
    DatabaseUnreachable,
    asyncpg.ClientCannotConnectError,
    asyncpg.ConnectionRejectionError,
    asyncpg.CannotConnectNowError,
)
# And those that say the connection was lost during the call: a change may have been saved.
# InternalClientError is what asyncpg raises on a connection a server restart left half-way
# through an operation ("cannot switch to state 12; another operation is in progress").
_DATABASE_LOST: tuple[type[Exception], ...] = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.ConnectionFailureError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InternalClientError,
)
# asyncpg.InterfaceError is also a misuse of the driver (a bug); these are the ones a lost
# connection or a pool shutting down causes.
_CLOSED_MESSAGES = ("connection is closed", "pool is closing", "pool is closed")


def _cause(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= _CAUSE_CHARS else text[:_CAUSE_CHARS] + "..."


def _unavailable(store: str, reason: str, exc: BaseException, *, reached: bool) -> Unavailable:
    aftermath = (
        "the connection was lost during the call, so a change may already be saved (a create "
        "retried with its id finds it: ALREADY_EXISTS)" if reached else "retrying is safe"
    )
    return Unavailable(
        f"{store} is unavailable ({_cause(exc)}); retry the call after a backoff: {aftermath}",
        reason=reason,
        metadata={"store": store},
        retry_delay_s=UNAVAILABLE_RETRY_S,
    )


def _exhausted(store: str, reason: str, setting: str, exc: BaseException) -> ResourceExhausted:
    return ResourceExhausted(
        f"{store} has no connection to spare ({_cause(exc)}); retry after the delay given, or "
        f"raise {setting} if this persists",
        reason=reason,
        metadata={"store": store},
        retry_delay_s=EXHAUSTED_RETRY_S,
    )


def store_error(exc: Exception) -> CorralError | None:
    """The domain error a PostgreSQL or Redis failure stands for, or None when `exc` is not one:
    the store could not be reached (UNAVAILABLE: retry), or every connection of the pool was busy
    (RESOURCE_EXHAUSTED: retry after the delay)."""
    if isinstance(exc, DatabasePoolExhausted):
        return _exhausted("PostgreSQL", "DATABASE_POOL_EXHAUSTED", "CORRAL_DB_POOL_MAX", exc)
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return _exhausted(
            "PostgreSQL", "DATABASE_CONNECTIONS_EXHAUSTED", "PostgreSQL's max_connections", exc
        )
    if isinstance(exc, _DATABASE_NOT_REACHED):
        return _unavailable("PostgreSQL", "DATABASE_UNAVAILABLE", exc, reached=False)
    if isinstance(exc, _DATABASE_LOST) or (
        isinstance(exc, asyncpg.InterfaceError) and str(exc) in _CLOSED_MESSAGES
    ):
        return _unavailable("PostgreSQL", "DATABASE_UNAVAILABLE", exc, reached=True)
    # RedisPoolExhausted (services/common/kv.py) is one.
    if isinstance(exc, redis.exceptions.MaxConnectionsError):
        return _exhausted("Redis", "REDIS_POOL_EXHAUSTED", "CORRAL_REDIS_MAX_CONNECTIONS", exc)
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        # Redis's commands here are single writes or scripts: a retry is safe (a lease taken by
        # the lost call is refused to its retry as SESSION_BUSY, and expires).
        return _unavailable("Redis", "REDIS_UNAVAILABLE", exc, reached=False)
    return None
