"""The clock and the id source every domain takes through its constructor, so a test can pass a
fake one instead of patching time or uuid."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware (UTC)."""
        ...


class IdSource(Protocol):
    def new_id(self) -> str:
        """A new id nobody has used: 32 lowercase hex digits from the system's source."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class RandomIds:
    def new_id(self) -> str:
        return uuid.uuid4().hex
