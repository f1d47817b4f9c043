"""The one mapping of PostgreSQL and Redis failures to what a caller sees: UNAVAILABLE while a
store cannot be reached, RESOURCE_EXHAUSTED with a retry delay when its pool is busy; the
store's settings; the retry delay surviving a hop between services."""

from __future__ import annotations

from typing import Any

import asyncpg
import grpc
import pytest
import redis.exceptions
from google.rpc import error_details_pb2, status_pb2

from services.common.db import DatabasePoolExhausted, DatabaseUnreachable
from services.common.errors import MAX_MESSAGE, DeadlineExceeded, ResourceExhausted
from services.common.interceptors import Context, ErrorMappingInterceptor
from services.common.kv import RedisPoolExhausted
from services.common.settings import Settings, SettingsError, StorePools
from services.common.status import from_rpc_error, google_status, status_code, to_status
from services.common.store_errors import store_error

UNAVAILABLE, EXHAUSTED = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("exc", "code", "reason", "store"),
    [
        (DatabaseUnreachable("ConnectionRefusedError: [Errno 111]"), UNAVAILABLE,
         "DATABASE_UNAVAILABLE", "PostgreSQL"),
        (DatabaseUnreachable("no connection within 5 s"), UNAVAILABLE, "DATABASE_UNAVAILABLE",
         "PostgreSQL"),
        (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
         UNAVAILABLE, "DATABASE_UNAVAILABLE", "PostgreSQL"),
        (asyncpg.CannotConnectNowError("the database system is starting up"), UNAVAILABLE,
         "DATABASE_UNAVAILABLE", "PostgreSQL"),
        (asyncpg.AdminShutdownError("terminating connection due to administrator command"),
         UNAVAILABLE, "DATABASE_UNAVAILABLE", "PostgreSQL"),
        (asyncpg.InterfaceError("connection is closed"), UNAVAILABLE, "DATABASE_UNAVAILABLE",
         "PostgreSQL"),
        # Seen by `make chaos` when PostgreSQL was killed under load.
        (asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in "
                                     "progress"), UNAVAILABLE, "DATABASE_UNAVAILABLE", "PostgreSQL"),
        (DatabasePoolExhausted(10, 5.0), EXHAUSTED, "DATABASE_POOL_EXHAUSTED", "PostgreSQL"),
        (asyncpg.TooManyConnectionsError("sorry, too many clients already"), EXHAUSTED,
         "DATABASE_CONNECTIONS_EXHAUSTED", "PostgreSQL"),
        (redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6390."), UNAVAILABLE,
         "REDIS_UNAVAILABLE", "Redis"),
        (redis.exceptions.ConnectionError("Connection closed by server."), UNAVAILABLE,
         "REDIS_UNAVAILABLE", "Redis"),
        (redis.exceptions.TimeoutError("Timeout reading from socket"), UNAVAILABLE,
         "REDIS_UNAVAILABLE", "Redis"),
        (RedisPoolExhausted(50, 5.0), EXHAUSTED, "REDIS_POOL_EXHAUSTED", "Redis"),
        (redis.exceptions.MaxConnectionsError("Too many connections"), EXHAUSTED,
         "REDIS_POOL_EXHAUSTED", "Redis"),
    ],
)
def test_a_store_failure_says_which_store_and_when_to_retry(
    exc: Exception, code: grpc.StatusCode, reason: str, store: str
) -> None:
    error = store_error(exc)
    assert error is not None
    assert (status_code(error), error.reason, error.metadata["store"]) == (code, reason, store)
    assert error.message.startswith(store)
    assert "retry" in error.message
    assert error.retry_delay_s is not None and error.retry_delay_s > 0


def test_an_outage_message_says_whether_a_retry_is_safe_and_exhaustion_names_the_setting() -> None:
    refused = store_error(DatabaseUnreachable("ConnectionRefusedError: [Errno 111]"))
    lost = store_error(asyncpg.ConnectionDoesNotExistError(
        "connection was closed in the middle of operation"))
    busy = store_error(DatabasePoolExhausted(10, 5.0))
    redis_busy = store_error(RedisPoolExhausted(50, 5.0))
    assert refused is not None and lost is not None
    assert busy is not None and redis_busy is not None
    assert refused.message.endswith("retrying is safe")
    # The connection went during the call: a commit may have happened before it did.
    assert "may already be saved" in lost.message and "ALREADY_EXISTS" in lost.message
    assert len(lost.message.encode()) <= MAX_MESSAGE
    assert "all 10 connections" in busy.message and "CORRAL_DB_POOL_MAX" in busy.message
    assert "CORRAL_REDIS_MAX_CONNECTIONS" in redis_busy.message


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.UniqueViolationError("duplicate key value"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        redis.exceptions.ResponseError("NOSCRIPT No matching script"),
        OSError("which store? none said"),
        ValueError("a bug"),
    ],
)
def test_other_failures_are_not_store_outages(exc: Exception) -> None:
    """A bug must stay visible as one (INTERNAL, logged), not pass for an outage to retry."""
    assert store_error(exc) is None


def _retry_delay(status: status_pb2.Status) -> float | None:
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToMilliseconds() / 1000
    return None


def test_the_retry_delay_reaches_the_caller_and_survives_a_hop() -> None:
    """Sessions' busy pool reaches the router's caller with its code, reason, domain and delay."""
    error = ResourceExhausted("busy", reason="REDIS_POOL_EXHAUSTED", retry_delay_s=1.5)
    status = google_status(error, "sessions")
    assert _retry_delay(status) == 1.5
    assert _retry_delay(google_status(ResourceExhausted("over quota"), "sessions")) is None
    sent = to_status(error, "sessions")
    err = grpc.aio.AioRpcError(
        sent.code, grpc.aio.Metadata(), grpc.aio.Metadata(*sent.trailing_metadata), sent.details
    )
    passed_on = from_rpc_error(err, "sessions")
    assert isinstance(passed_on, ResourceExhausted)
    assert (passed_on.reason, passed_on.domain, passed_on.retry_delay_s) == (
        "REDIS_POOL_EXHAUSTED", "sessions", 1.5)


def test_a_call_whose_deadline_ran_out_names_the_service_that_did_not_answer() -> None:
    err = grpc.aio.AioRpcError(
        grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(),
        "Deadline Exceeded")
    timed_out = from_rpc_error(err, "sessions")
    assert isinstance(timed_out, DeadlineExceeded) and timed_out.domain == "sessions"
    assert timed_out.message == "sessions did not answer in time (Deadline Exceeded); retry shortly"


class _AbortingContext:
    """Just what the error mapping calls: aborting ends the handler, as grpc.aio's does."""

    def __init__(self) -> None:
        self.status: grpc.Status | None = None

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.status = status
        raise grpc.aio.AbortError()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"answered {code.name}: {details}")


async def _answer(interceptor: ErrorMappingInterceptor, exc: Exception) -> grpc.Status:
    async def behavior(_request: Any, _context: Context) -> None:
        raise exc

    handler = grpc.unary_unary_rpc_method_handler(behavior)
    wrapped = interceptor._wrap(handler, "/corral.sessions.v1.SessionsService/GetSession")
    context = _AbortingContext()
    with pytest.raises(grpc.aio.AbortError):
        await wrapped.unary_unary(object(), context)
    assert context.status is not None
    return context.status


async def test_the_error_mapping_answers_a_store_failure_with_its_status() -> None:
    interceptor = ErrorMappingInterceptor("sessions", store_error)
    status = await _answer(interceptor, redis.exceptions.ConnectionError("Connection refused"))
    assert status.code == UNAVAILABLE
    assert status.details.startswith("Redis is unavailable")
    google = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    assert google.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("REDIS_UNAVAILABLE", "sessions")


def test_pool_sizes_come_from_settings() -> None:
    settings = Settings.from_env(
        {"CORRAL_DB_POOL_MAX": "25", "CORRAL_REDIS_MAX_CONNECTIONS": "7", "CORRAL_STORE_WAIT_S": "2"}
    )
    assert settings.pools == StorePools(db_min=1, db_max=25, redis_max=7, wait_s=2.0)
    assert Settings.from_env({}).pools == StorePools(db_min=1, db_max=10, redis_max=50, wait_s=5.0)
    with pytest.raises(SettingsError, match="CORRAL_DB_POOL_MIN"):
        Settings.from_env({"CORRAL_DB_POOL_MIN": "11"})
    with pytest.raises(SettingsError, match="CORRAL_REDIS_MAX_CONNECTIONS"):
        Settings.from_env({"CORRAL_REDIS_MAX_CONNECTIONS": "0"})
