"""The executor fleet as routers and executors see it: its members, and FleetView, a copy of the
members polled every second (fleet_client.py asks the sessions service) that says when it is
stale. No gRPC here."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from services.common.background import Periodic
from services.common.errors import CorralError

log = logging.getLogger(__name__)

EXECUTOR_PREFIX = "executors/"
# DNS-label-like, so a StatefulSet's pod names (corral-executor-0) and `<host>-<6 hex>` fit.
EXECUTOR_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,98}[a-z0-9])?$")
POLL_EVERY_S = 1.0
# A view not refreshed for this long no longer says who is alive (the members' own TTL).
STALE_AFTER_S = 3.0


@dataclass(frozen=True)
class FleetMember:
    name: str  # bare: `executors/{name}`
    address: str
    capacity: int
    in_use: int
    warm_versions: frozenset[str]
    draining: bool = False
    driver: str = ""
    instance_id: str = ""
    start_time: datetime | None = None
    heartbeat_time: datetime | None = None

    @property
    def resource(self) -> str:
        return f"{EXECUTOR_PREFIX}{self.name}"


@dataclass(frozen=True)
class Beat:
    """What an executor says of itself each second."""

    name: str
    address: str
    instance_id: str
    driver: str
    capacity: int
    in_use: int
    warm_versions: Sequence[str]
    start_time: datetime


def _shape(members: Iterable[FleetMember]) -> set[tuple[str, str, bool]]:
    """What a change of the fleet is: members, their addresses and drained marks (not load)."""
    return {(m.name, m.address, m.draining) for m in members}


class FleetView:
    """The live members, polled every second. `on_change` hears of each new set of members."""

    def __init__(
        self, source: Callable[[], Awaitable[list[FleetMember]]],
        on_change: Callable[[Sequence[FleetMember]], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._on_change = on_change
        self._clock = clock
        self._members: dict[str, FleetMember] = {}
        self._refreshed_at: float | None = None
        self._poller = Periodic(self.refresh, every_s=POLL_EVERY_S, what="fleet view")

    def start(self) -> None:
        self._poller.start()

    async def close(self) -> None:
        await self._poller.close()

    async def refresh(self) -> None:
        try:
            members = await self._source()
        except CorralError as exc:
            log.warning("could not list the executor fleet: %s", exc.message)
            return
        changed = _shape(members) != _shape(self._members.values())
        self._members = {m.name: m for m in members}
        self._refreshed_at = self._clock()
        if changed and self._on_change is not None:
            await self._on_change(members)

    async def refresh_if_older(self, seconds: float) -> None:
        """Refreshes now unless the view is younger than `seconds`: a miss (no executor, or
        one that is not known yet) looks again, without a look per request."""
        if self._refreshed_at is None or self._clock() - self._refreshed_at >= seconds:
            await self.refresh()

    @property
    def stale(self) -> bool:
        return self._refreshed_at is None or self._clock() - self._refreshed_at > STALE_AFTER_S

    def members(self) -> list[FleetMember]:
        return list(self._members.values())

    def get(self, name: str) -> FleetMember | None:
        return self._members.get(name)
