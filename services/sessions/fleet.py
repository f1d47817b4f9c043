"""The executor fleet: executors say every second that they are alive (with their load and warm
versions), routers list the live ones to place sessions, administrators drain them. Membership
lives in Redis with a TTL (fleet_store.py); no gRPC here."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from services.common.clock import Clock, SystemClock
from services.common.errors import NotFound
from services.common.identity import Caller
from services.common.paging import Page, PageQuery
from services.sessions import fleet_rules
from services.sessions.fleet_model import ExecutorMember, FleetStore

log = logging.getLogger(__name__)


def _by_name(member: ExecutorMember) -> tuple[str]:
    return (member.name,)


class Fleet:
    def __init__(self, store: FleetStore, clock: Clock | None = None) -> None:
        self._store = store
        self._clock = clock or SystemClock()

    def now(self) -> datetime:
        return self._clock.now()

    async def heartbeat(self, member: ExecutorMember) -> bool:
        """Records the executor as alive for HEARTBEAT_TTL_S; whether it is drained."""
        fleet_rules.check_beat(
            member.address, member.capacity, member.in_use, len(member.warm_versions))
        return await self._store.beat(member, fleet_rules.HEARTBEAT_TTL_S)

    async def list(self, caller: Caller, page_size: int, page_token: str) -> Page[ExecutorMember]:
        fleet_rules.check_manager(caller, "list the executor fleet")
        query = PageQuery.start(
            "ListExecutors", owner="", where=None, page_size=page_size, token=page_token,
            key_shape=(str,),
        )
        members: Sequence[ExecutorMember] = await self._store.members()
        if query.after is not None:
            members = [m for m in members if _by_name(m) > query.after]
        return query.page(members[: query.fetch_limit], key=_by_name)

    async def live(self, name: str) -> ExecutorMember | None:
        return await self._store.member(name)

    async def drain(self, caller: Caller, name: str, drained: bool) -> ExecutorMember:
        """Sets or clears the executor's drained mark; the executor as it now is (only its name
        and the mark when it is not live)."""
        fleet_rules.check_manager(caller, "drain or undrain executors")
        member = await self._store.member(name)
        if member is None and not await self._store.is_drained(name):
            raise NotFound(
                f"executors/{name} is not in the fleet (no heartbeat in the last "
                f"{fleet_rules.HEARTBEAT_TTL_S:g} s); `corral executors list` shows its members",
                metadata={"executor": f"executors/{name}"},
            )
        await self._store.set_drained(name, drained)
        log.info("executors/%s %s by %s", name, "drained" if drained else "undrained",
                 caller.describe())
        if member is None:
            epoch = datetime.fromtimestamp(0, self.now().tzinfo)
            member = ExecutorMember(name, "", "", "", 0, 0, (), epoch, epoch)
        return member.drained(drained)
