"""Which executor a session's turn goes to: a new session's placement (placement.place over the
fleet view), and for a session placed before, its recorded executor while that one is live and
undrained, else a new placement recorded with PlaceSession (a compare-and-set, so two routers
moving one session agree on one executor)."""

from __future__ import annotations

import logging
from dataclasses import replace

from services.common.errors import Aborted, Unavailable
from services.common.fleet import FleetMember, FleetView
from services.router import placement
from services.router.model import SessionPin, SessionsClient

log = logging.getLogger(__name__)

REASON_NO_EXECUTORS = "NO_EXECUTORS"
# How long a caller is told to wait when there is no executor: about one heartbeat.
NO_EXECUTORS_RETRY_S = 1.0
# A miss in the fleet view looks again at most this often.
LOOK_AGAIN_S = 0.2


class Placement:
    def __init__(self, fleet: FleetView, sessions: SessionsClient) -> None:
        self.fleet = fleet
        self._sessions = sessions

    async def for_new(self, session_id: str, version: str, avoid: str = "") -> FleetMember:
        chosen = placement.place(session_id, version, self._members(avoid))
        if chosen is None:
            await self.fleet.refresh_if_older(LOOK_AGAIN_S)
            chosen = placement.place(session_id, version, self._members(avoid))
        if chosen is None:
            raise self._no_executors()
        return chosen

    def _members(self, avoid: str) -> list[FleetMember]:
        return [m for m in self.fleet.members() if m.name != avoid]

    async def executor_for(
        self, pin: SessionPin, avoid: str = ""
    ) -> tuple[SessionPin, FleetMember]:
        """The executor `pin`'s turn goes to, and the pin as it is after any move; never
        `avoid` (an executor that just could not be reached, though the fleet still lists it)."""
        if pin.executor and self.fleet.get(pin.executor) is None:
            await self.fleet.refresh_if_older(LOOK_AGAIN_S)  # it may have just come back
        current = self.fleet.get(pin.executor) if pin.executor else None
        if current is not None and placement.serves(current) and current.name != avoid:
            return pin, current
        chosen = await self.for_new(pin.session.session, pin.version.name, avoid)
        try:
            moved = await self._sessions.place(
                pin.owner.tenant, pin.session, chosen.name, pin.executor)
        except Aborted as exc:
            if exc.reason != "PLACEMENT_CONFLICT":
                raise
            # Another router moved it first: its choice stands, if that executor serves.
            moved_by = exc.metadata.get("executor", "").removeprefix("executors/")
            theirs = self.fleet.get(moved_by)
            if theirs is None or not placement.serves(theirs) or theirs.name == avoid:
                raise
            return _placed(pin, theirs.name), theirs
        log.info("%s moved from executors/%s to executors/%s", pin.session.name,
                 pin.executor or "(none)", chosen.name)
        return moved, chosen

    def _no_executors(self) -> Unavailable:
        members = self.fleet.members()
        if members:
            why = f"all {len(members)} executors of the fleet are drained"
        elif self.fleet.stale:
            why = "no executor is known: the sessions service, which keeps the fleet, does not answer"
        else:
            why = "no executor is in the fleet"
        return Unavailable(
            f"{why}, so no executor can run this session; retry shortly",
            reason=REASON_NO_EXECUTORS, retry_delay_s=NO_EXECUTORS_RETRY_S,
        )


def _placed(pin: SessionPin, executor: str) -> SessionPin:
    return replace(pin, executor=executor)
