"""One error tree for domain code. It imports no grpc: services/common/status.py holds the one
table that maps these to gRPC status codes, in both directions."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

# How much of a caller's value an error message repeats, and how long a message may be in all: a
# client must be able to read its error even when the request carried a megabyte.
MAX_QUOTED = 120
MAX_MESSAGE = 300


def quoted(value: object, limit: int = MAX_QUOTED) -> str:
    """`value` as an error message shows it: its repr, cut to `limit` characters with a note of
    how long the whole was."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[:limit]}... ({size} characters in all)"


def bounded(message: str, limit: int = MAX_MESSAGE) -> str:
    """A message cut to about `limit` bytes (UTF-8), keeping its end, which says what to do."""
    if len(message.encode()) <= limit:
        return message
    tail = message[-(limit // 3) :]
    head = message[: limit - len(tail) - 10]
    while len(f"{head} [...] {tail}".encode()) > limit and head:
        head = head[: len(head) // 2] if len(head) > limit else head[:-8]
    return f"{head} [...] {tail}"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class CorralError(Exception):
    """A failure the caller can act on; the subclass says what kind (and so its status code).

    `reason` is an UPPER_SNAKE word for programs (ErrorInfo.reason; by default the kind's name,
    NotFound → NOT_FOUND), `violations` name the bad request fields, `metadata` carries figures
    (ErrorInfo.metadata). `domain` is the service the error came from when it was passed on from
    another service, else empty (the reporting service's own). `stack` is a stack trace the caller
    may read (google.rpc.DebugInfo): an agent's own, never the platform's. `retry_delay_s`, when set, is
    how long the caller should wait before retrying (google.rpc.RetryInfo)."""

    default_reason: ClassVar[str] = "INTERNAL"

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls.default_reason = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).upper()

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        violations: Sequence[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
        domain: str = "",
        stack: str = "",
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.violations = tuple(violations)
        self.metadata = dict(metadata or {})
        self.domain = domain
        self.stack = stack
        self.retry_delay_s = retry_delay_s


class InvalidArgument(CorralError):
    """The request is wrong, whatever the state of the system: the caller must fix it. Name the
    field (InvalidArgument.field) and say what a right value looks like."""

    @classmethod
    def field(cls, field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
        return cls(
            f"{field}: {description}", reason=reason, violations=[FieldViolation(field, description)]
        )


class NotFound(CorralError):
    """The named resource does not exist (or the caller may not know that it does)."""


class AlreadyExists(CorralError):
    """A create named a resource that exists already."""


class FailedPrecondition(CorralError):
    """The system is not in the state the call needs (a stopped session, a version an endpoint
    still routes to): change the state first; retrying as it is will fail again."""


class Aborted(CorralError):
    """A read-modify-write lost a race (an etag that changed, a busy session): read again and
    retry the whole operation."""


class PermissionDenied(CorralError):
    """The caller is known but may not do this."""


class Unauthenticated(CorralError):
    """The call carries no credential, or one that is not valid."""


class ResourceExhausted(CorralError):
    """A limit was reached: a quota, a size, a rate. Retrying later may help; retrying at once
    will not."""


class Unavailable(CorralError):
    """A service or store could not be reached: retry the call, after a backoff."""


class DeadlineExceeded(CorralError):
    """The work did not finish in the time it was given."""


class Cancelled(CorralError):
    """The caller went away, or the work was stopped on purpose."""


class Internal(CorralError):
    """A bug or a broken invariant. The message says where to look; the service's log has the
    traceback."""
