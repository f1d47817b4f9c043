"""The session pins a router has seen, so that a session's later turns skip asking sessions."""

from __future__ import annotations

from collections import OrderedDict

from corral.names import SessionRef
from services.router.model import SessionPin

# A pin is found by its session's tenant and id: the same id in two tenants is two sessions.
PinKey = tuple[str, SessionRef]


class PinCache:
    """The most recently used pins, up to `capacity`. A pin changes only when a rollback retires
    its version, which the router checks for before trusting a cached one."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._pins: OrderedDict[PinKey, SessionPin] = OrderedDict()

    def get(self, tenant: str, session: SessionRef) -> SessionPin | None:
        pin = self._pins.get((tenant, session))
        if pin is not None:
            self._pins.move_to_end((tenant, session))
        return pin

    def put(self, pin: SessionPin) -> None:
        key = (pin.owner.tenant, pin.session)
        self._pins[key] = pin
        self._pins.move_to_end(key)
        while len(self._pins) > self.capacity:
            self._pins.popitem(last=False)

    def forget(self, tenant: str, session: SessionRef) -> None:
        self._pins.pop((tenant, session), None)
