"""Fakes for unit tests, in one place: each stands in for one Protocol seam of a service (its
store, clock, id source, or a clients module) so a domain can be tested without a socket."""

from __future__ import annotations

# -- sessions ----------------------------------------------------------------------------------


# -- router ------------------------------------------------------------------------------------


# -- registry ----------------------------------------------------------------------------------


# -- executor ----------------------------------------------------------------------------------


class FakeRedis:
    """The two commands the executor's revocation store uses, with the expiry they were given."""

    def __init__(self) -> None:
        self.ttl: dict[str, int] = {}

    async def set(self, key: str, _value: bytes, ex: int) -> None:
        self.ttl[key] = ex

    async def exists(self, key: str) -> int:
        return int(key in self.ttl)


# -- telemetry ---------------------------------------------------------------------------------
