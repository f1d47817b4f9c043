"""One error tree for domain code. It imports no grpc: services/common/status.py holds the one
table that maps these to gRPC status codes, in both directions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class CorralError(Exception):
    """A failure the caller can act on; the subclass says what kind (and so its status code).

    `reason` is an UPPER_SNAKE word for programs (ErrorInfo.reason), `violations` name the bad
    request fields, `metadata` carries figures (ErrorInfo.metadata). `domain` is the service the
    error came from when it was passed on from another service, else empty (the reporting
    service's own)."""

    default_reason: ClassVar[str] = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        violations: Sequence[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
        domain: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.violations = tuple(violations)
        self.metadata = dict(metadata or {})
        self.domain = domain


class InvalidArgument(CorralError):
    """The request is wrong; fixing it is the caller's to do."""

    default_reason = "INVALID_ARGUMENT"

    @classmethod
    def field(cls, field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
        return cls(
            f"{field}: {description}", reason=reason, violations=[FieldViolation(field, description)]
        )


class NotFound(CorralError):
    default_reason = "NOT_FOUND"


class AlreadyExists(CorralError):
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(CorralError):
    """The system is not in the state the call needs; change the state first."""

    default_reason = "FAILED_PRECONDITION"


class Aborted(CorralError):
    """A read-modify-write lost a race (etag, busy session): read again and retry."""

    default_reason = "ABORTED"


class PermissionDenied(CorralError):
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(CorralError):
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(CorralError):
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(CorralError):
    """Retry the call, after a backoff."""

    default_reason = "UNAVAILABLE"


class DeadlineExceeded(CorralError):
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(CorralError):
    default_reason = "CANCELLED"


class Internal(CorralError):
    """A bug or a broken invariant; the message says where to look."""

    default_reason = "INTERNAL"
