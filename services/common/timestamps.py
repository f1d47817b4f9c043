"""Conversions between datetimes and protobuf Timestamps and Durations, shared by every servicer.
A request's Timestamp or Duration outside what the types allow is the caller's error, named by
its field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from services.common.errors import InvalidArgument

# What google.protobuf.Timestamp allows: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
# What google.protobuf.Duration allows: about ±10,000 years.
_MAX_DURATION_SECONDS = 315_576_000_000


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def optional_time(message: Message, field: str, label: str = "") -> datetime | None:
    """The datetime (UTC) in `message.field`, or None when the field is unset; `label` is the
    field's path in the request, for the error (by default the field's name)."""
    if not message.HasField(field):
        return None
    label = label or field
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    if not _MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS or not 0 <= stamp.nanos < 1_000_000_000:
        raise InvalidArgument.field(
            label,
            f"seconds={stamp.seconds}, nanos={stamp.nanos} is not a timestamp: use a time from "
            "0001-01-01 to 9999-12-31 (nanos from 0 to 999,999,999)",
            reason="OUT_OF_RANGE",
        )
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument.field(
            label, "is outside the times this service can store (0001-01-01 to 9999-12-31)",
            reason="OUT_OF_RANGE",
        ) from None


def checked_duration(
    message: Message, field: str, label: str = "", *, maximum: timedelta | None = None
) -> timedelta | None:
    """The timedelta in `message.field` (None when unset): a Duration the type allows, not
    negative, and at most `maximum` when given."""
    if not message.HasField(field):
        return None
    label = label or field
    span: duration_pb2.Duration = getattr(message, field)
    seconds, nanos = span.seconds, span.nanos
    if (
        abs(seconds) > _MAX_DURATION_SECONDS
        or abs(nanos) >= 1_000_000_000
        or (seconds > 0 > nanos)
        or (seconds < 0 < nanos)
    ):
        raise InvalidArgument.field(
            label, f"seconds={seconds}, nanos={nanos} is not a valid Duration", reason="OUT_OF_RANGE"
        )
    if seconds < 0 or nanos < 0:
        raise InvalidArgument.field(label, "must not be negative", reason="OUT_OF_RANGE")
    value = span.ToTimedelta()
    if maximum is not None and value > maximum:
        raise InvalidArgument.field(
            label, f"must be at most {maximum.total_seconds():g}s", reason="OUT_OF_RANGE"
        )
    return value
