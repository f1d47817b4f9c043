"""What several services' fakes share: a clock that moves only when a test moves it, ids a test
can predict, keyset paging as the stores' SQL reads it, and DNS answers a test chooses."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from services.common.outbound import IPAddress, Resolver
from services.common.paging import Key

T0 = datetime(2030, 1, 1, tzinfo=UTC)

Row = TypeVar("Row")


class FakeClock:
    """A clock that moves only when a test advances it."""

    def __init__(self, start: datetime = T0) -> None:
        self.time = start

    def now(self) -> datetime:
        return self.time

    def advance(self, seconds: float) -> None:
        self.time += timedelta(seconds=seconds)


class EpochClock:
    """A `time.time`-style clock (seconds since the epoch) that moves when a test sets `now`."""

    def __init__(self, now: float = T0.timestamp()) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SequentialIds:
    """id0001, id0002, ...: ids a test can predict."""

    def __init__(self) -> None:
        self.n = 0

    def new_id(self) -> str:
        self.n += 1
        return f"id{self.n:04d}"


def keyset_page(
    rows: Sequence[Row], key: Callable[[Row], Key], after: Key | None, limit: int | None,
    *, newest_first: bool = False,
) -> list[Row]:
    """The rows past `after` in `key` order (descending when `newest_first`), at most `limit` of
    them: a keyset page, as the stores' SQL reads it."""
    ordered = sorted(rows, key=key, reverse=newest_first)
    if after is not None:
        bound = tuple(after)
        ordered = [r for r in ordered if (key(r) < bound if newest_first else key(r) > bound)]
    return ordered[:limit] if limit is not None else ordered


class FakeResolver:
    """DNS as a test wants it: names map to the addresses given (a name rebound to the metadata
    server, a name with one good and one bad address); other names do not resolve, unless
    `fallback` (the system's resolver, say) answers them. Counts the lookups it answers."""

    def __init__(self, names: Mapping[str, Sequence[str]],
                 fallback: Resolver | None = None) -> None:
        self.names = {name: [ipaddress.ip_address(a) for a in addrs] for name, addrs in names.items()}
        self.fallback = fallback
        self.lookups: list[str] = []

    async def resolve(self, host: str, port: int) -> Sequence[IPAddress]:
        self.lookups.append(host)
        if host in self.names:
            return self.names[host]
        if self.fallback is not None:
            return await self.fallback.resolve(host, port)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
