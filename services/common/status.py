"""The one table between the domain error tree and gRPC status codes.

Servers: `to_status` turns a domain error into a grpc.Status carrying google.rpc.ErrorInfo (and
BadRequest for bad input, RetryInfo when the error says how long to wait). Clients: `from_rpc_error` turns a failed call back into the domain
error it stands for, so a service's clients module raises the same tree its domain catches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from corral.names import ResourceNameError
from services.common.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    CorralError,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    bounded,
)

STATUS_CODES: Mapping[type[CorralError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Aborted: grpc.StatusCode.ABORTED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Internal: grpc.StatusCode.INTERNAL,
}
_ERRORS: Mapping[grpc.StatusCode, type[CorralError]] = {v: k for k, v in STATUS_CODES.items()}


def status_code(error: CorralError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if issubclass(cls, CorralError) and cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def domain_error(exc: Exception) -> CorralError | None:
    """The domain error an exception stands for, or None when it is not one (a bug)."""
    if isinstance(exc, CorralError):
        return exc
    if isinstance(exc, ResourceNameError):
        return InvalidArgument.field(exc.field, exc.message)
    return None


# How much of a stack trace an error carries (UTF-8 bytes): it travels in the call's trailers,
# which gRPC bounds (8 KiB by default) together with everything else they hold.
MAX_STACK = 3000


def stack_entries(stack: str, limit: int = MAX_STACK) -> list[str]:
    """A stack trace's lines within `limit` bytes, keeping the last ones (where it raised) and
    saying how many earlier lines were left out."""
    lines = stack.rstrip("\n").splitlines()
    kept: list[str] = []
    size = 0
    for line in reversed(lines):
        line = bounded(line, 500)
        size += len(line.encode()) + 1
        if size > limit:
            break
        kept.append(line)
    kept.reverse()
    if len(kept) < len(lines):
        kept.insert(0, f"... ({len(lines) - len(kept)} earlier lines left out)")
    return kept


def _pack(
    message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest | error_details_pb2.DebugInfo
    | error_details_pb2.RetryInfo,
) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(error: CorralError, domain: str) -> grpc.Status:
    """The grpc.Status (with ErrorInfo and, for bad input, BadRequest; RetryInfo when the error
    has a retry delay) for a domain error. Its
    texts are bounded: a message built around a huge input still reaches the caller readable."""
    return rpc_status.to_status(google_status(error, domain))


def google_status(error: CorralError, domain: str) -> status_pb2.Status:
    """The google.rpc.Status of to_status, for a transport that sends it as it is (HTTP)."""
    code = status_code(error)
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=error.reason,
                domain=error.domain or domain,
                metadata={k: bounded(v) for k, v in error.metadata.items()},
            )
        )
    ]
    if error.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=bounded(v.field), description=bounded(v.description)
                        )
                        for v in error.violations
                    ]
                )
            )
        )
    if error.stack:
        details.append(_pack(error_details_pb2.DebugInfo(stack_entries=stack_entries(error.stack))))
    if error.retry_delay_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(round(error.retry_delay_s * 1000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(
        code=code_pb2.Code.Value(code.name), message=bounded(error.message), details=details
    )


_DETAILS_KEY = "grpc-status-details-bin"
_Detail = TypeVar(
    "_Detail", error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.DebugInfo,
    error_details_pb2.RetryInfo,
)


def _google_status(err: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """The google.rpc.Status a server attached to a failed call (what grpc_status's from_call
    reads, for the aio error its stubs do not take)."""
    for key, value in err.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def _detail(status: status_pb2.Status | None, message: _Detail) -> _Detail | None:
    for detail in status.details if status is not None else ():
        if detail.Unpack(message):
            return message
    return None


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo a Corral service attached to a failed call, if any."""
    return _detail(_google_status(err), error_details_pb2.ErrorInfo())


def retry_delay_s(err: grpc.aio.AioRpcError) -> float | None:
    """How long the service asked the caller to wait before retrying (RetryInfo), if it did."""
    info = _detail(_google_status(err), error_details_pb2.RetryInfo())
    return info.retry_delay.ToMilliseconds() / 1000 if info is not None else None


def field_violations(err: grpc.aio.AioRpcError) -> list[FieldViolation]:
    """The BadRequest field violations a Corral service attached to a failed call."""
    bad = _detail(_google_status(err), error_details_pb2.BadRequest())
    if bad is None:
        return []
    return [FieldViolation(v.field, v.description) for v in bad.field_violations]


def from_rpc_error(err: grpc.aio.AioRpcError, service: str) -> CorralError:
    """The domain error a failed call to `service` stands for, keeping its reason, field
    violations, metadata, stack trace and retry delay. A service that cannot be reached is
    Unavailable, naming it."""
    code = err.code()
    message = err.details() or code.name
    info = error_info(err)
    debug = _detail(_google_status(err), error_details_pb2.DebugInfo())
    if info is None and code == grpc.StatusCode.UNAVAILABLE:
        # Not an answer from the service but a failure to reach it.
        message = f"{service} is unavailable ({message}); retry shortly"
    elif info is None and code == grpc.StatusCode.DEADLINE_EXCEEDED:
        # The caller's own deadline on the call ran out: the service did not answer in time.
        message = f"{service} did not answer in time ({message}); retry shortly"
    return _ERRORS.get(code, Internal)(
        message,
        reason=info.reason if info is not None and info.reason else None,
        violations=field_violations(err),
        metadata=dict(info.metadata) if info is not None else {},
        domain=info.domain if info is not None and info.domain else service,
        stack="\n".join(debug.stack_entries) if debug is not None else "",
        retry_delay_s=retry_delay_s(err),
    )


@contextmanager
def calling(service: str) -> Iterator[None]:
    """Raises a failed call to `service` inside the block as the domain error it stands for:
    clients modules wrap each call in it, so their callers see only the domain error tree."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc, service) from None
