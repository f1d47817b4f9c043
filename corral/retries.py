"""Retrying calls to the platform safely. A turn sent with a request id (AIP-155) can be sent again
after any failure: a turn that already committed comes back as its recorded result (marked
`replayed`) instead of running twice. So the client retries what is worth retrying — UNAVAILABLE,
RESOURCE_EXHAUSTED when the service said how long to wait (google.rpc.RetryInfo), and ABORTED while
the first attempt of the same request still runs — with bounded exponential back-off, and always
with the same request id."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
import tenacity
from google.rpc import error_details_pb2
from grpc_status import rpc_status

T = TypeVar("T")

# ABORTED reasons a retry with the same request id resolves: the first attempt is still running,
# or it committed while this one ran (the retry gets its result).
RETRYABLE_ABORTS = frozenset({"REQUEST_IN_PROGRESS", "REQUEST_ALREADY_COMMITTED"})


def new_request_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class RetryPolicy:
    """At most `attempts` tries, waiting from `first_s` doubling up to `max_s` between them (with
    jitter), or longer when the service asks for it."""

    attempts: int = 5
    first_s: float = 0.2
    max_s: float = 5.0

    def retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(retryable),
            stop=tenacity.stop_after_attempt(max(1, self.attempts)),
            wait=self._wait,
            reraise=True,
        )

    def _wait(self, state: tenacity.RetryCallState) -> float:
        backoff = tenacity.wait_exponential_jitter(
            multiplier=self.first_s, max=self.max_s, jitter=self.first_s
        )(state)
        failure = state.outcome.exception() if state.outcome is not None else None
        asked = retry_delay(failure) if isinstance(failure, grpc.RpcError) else None
        return max(backoff, asked or 0.0)


NO_RETRIES = RetryPolicy(attempts=1)


def _details(exc: grpc.RpcError) -> list[object]:
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except (AttributeError, ValueError):
        return []
    if status is None:
        return []
    found: list[object] = []
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found.append(message)
    return found


def retry_delay(exc: grpc.RpcError) -> float | None:
    """How long the service asked the caller to wait (google.rpc.RetryInfo), if it did."""
    for detail in _details(exc):
        if isinstance(detail, error_details_pb2.RetryInfo):
            return detail.retry_delay.seconds + detail.retry_delay.nanos / 1e9
    return None


def _reason(exc: grpc.RpcError) -> str:
    for detail in _details(exc):
        if isinstance(detail, error_details_pb2.ErrorInfo):
            return detail.reason
    return ""


def retryable(exc: BaseException) -> bool:
    """Whether sending the same request (same request id) again may succeed."""
    if not isinstance(exc, grpc.RpcError):
        return False
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return retry_delay(exc) is not None
    if code == grpc.StatusCode.ABORTED:
        return _reason(exc) in RETRYABLE_ABORTS
    return False


def call(policy: RetryPolicy, attempt: Callable[[], T]) -> T:
    """`attempt()`, tried again as `policy` says."""
    for retry in policy.retrying():
        with retry:
            return attempt()
    raise AssertionError("unreachable: tenacity reraises the last failure")


def stream(policy: RetryPolicy, attempt: Callable[[], Iterable[T]]) -> Iterator[T]:
    """The events of `attempt()`, the call opened again as `policy` says when it fails. Events
    of a failed attempt were already yielded: a retried stream starts over (a new `started`)."""
    for retry in policy.retrying():
        with retry:
            yield from attempt()
            return
