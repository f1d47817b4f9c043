"""This executor in the fleet: a heartbeat every second to the sessions service (its address,
load and warm versions), whether an administrator drained it, and which versions it keeps warm —
those whose rendezvous ranking over the live, undrained executors puts it in the top k
(CORRAL_WARM_POOL_REPLICAS), so warm pools are kept across the fleet rather than on every
executor."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from corral.names import VersionRef
from services.common import rendezvous
from services.common.background import Periodic
from services.common.errors import CorralError
from services.common.fleet import Beat, FleetMember

log = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 1.0


class FleetPort(Protocol):
    async def heartbeat(self, beat: Beat) -> bool:
        """Whether this executor is drained."""
        ...


class Load(Protocol):
    def in_use(self) -> int: ...

    def warm_versions(self) -> list[str]: ...


def keeps_warm(
    me: str, version: VersionRef, members: Sequence[FleetMember], replicas: int
) -> bool:
    """Whether `me` is among the `replicas` executors the version's ranking prefers. With no
    fleet known (or `me` not in it yet) every executor keeps its pools, as a single one does; a
    drained one keeps none."""
    if me not in {m.name for m in members}:
        return True
    names = [m.name for m in members if not m.draining]
    return me in rendezvous.top(version.name, names, replicas)


class Membership:
    def __init__(
        self, fleet: FleetPort, *, name: str, instance_id: str, driver: str, capacity: int,
        load: Load, started: datetime | None = None,
    ) -> None:
        self.name = name
        self.instance_id = instance_id
        self._fleet = fleet
        self._driver = driver
        self._capacity = capacity
        self._load = load
        self._started = started or datetime.now(UTC)
        # Where the other services reach it: set once the server listens (serving()).
        self.address = ""
        self.draining = False
        self._beater = Periodic(self.beat, every_s=HEARTBEAT_EVERY_S, what="fleet heartbeat")

    def serving(self, address: str) -> None:
        """Starts the heartbeats, from `address`."""
        self.address = address
        self._beater.start()

    async def close(self) -> None:
        await self._beater.close()

    async def beat(self) -> None:
        beat = Beat(
            name=self.name, address=self.address, instance_id=self.instance_id,
            driver=self._driver, capacity=self._capacity, in_use=self._load.in_use(),
            warm_versions=self._load.warm_versions(), start_time=self._started,
        )
        try:
            draining = await self._fleet.heartbeat(beat)
        except CorralError as exc:
            log.warning("heartbeat to the fleet failed: %s", exc.message)
            return
        if draining != self.draining:
            log.info("executors/%s is %s", self.name, "drained" if draining else "undrained")
        self.draining = draining


class WarmShare:
    """Which versions this executor keeps warm, from the fleet view: `keeps` for the pools."""

    def __init__(self, me: str, replicas: int, on_change: Callable[[], None]) -> None:
        self._me = me
        self._replicas = replicas
        self._members: Sequence[FleetMember] = ()
        self._on_change = on_change

    async def fleet_changed(self, members: Sequence[FleetMember]) -> None:
        self._members = members
        self._on_change()

    def keeps(self, version: VersionRef) -> bool:
        return keeps_warm(self._me, version, self._members, self._replicas)
