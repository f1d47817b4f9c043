"""The session pins a router has seen, so that a session's later turns skip asking sessions."""

from __future__ import annotations

from collections import OrderedDict

from corral.names import SessionRef
from services.router.model import SessionPin


class PinCache:
    """The most recently used pins, up to `capacity`. A pin changes only when a rollback retires
    its version, which the router checks for before trusting a cached one."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._pins: OrderedDict[SessionRef, SessionPin] = OrderedDict()

    def get(self, session: SessionRef) -> SessionPin | None:
        pin = self._pins.get(session)
        if pin is not None:
            self._pins.move_to_end(session)
        return pin

    def put(self, pin: SessionPin) -> None:
        self._pins[pin.session] = pin
        self._pins.move_to_end(pin.session)
        while len(self._pins) > self.capacity:
            self._pins.popitem(last=False)

    def forget(self, session: SessionRef) -> None:
        self._pins.pop(session, None)
