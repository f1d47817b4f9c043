"""Every executor's public keys, published to all of them: a tool verifies tokens against one JWKS
URL (`http://executor:9466/.well-known/jwks.json`, behind which any executor of the fleet may
answer), so each executor serves the keys of every executor, not only its own.

Each executor adds its keys to a shared set in Redis at start and with every rotation tick, each
entry kept until `retain_s` after the last time its executor published it: an executor that is
gone leaves its keys there as long as a token it signed may live, then they expire. Redis being
unavailable costs only the other executors' keys, never this one's."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

from services.common.errors import Unavailable
from services.executor.keys import Clock, KeyRing

log = logging.getLogger(__name__)

Jwks = dict[str, list[dict[str, str]]]


class FleetKeyStore(Protocol):
    """Where the fleet's public keys are shared (store.py: RedisJwks). Both raise Unavailable."""

    async def publish(self, keys: Sequence[dict[str, str]], *, until: float, now: float) -> None: ...

    async def read(self, *, now: float) -> list[dict[str, str]]: ...


class FleetKeys:
    def __init__(self, keyring: KeyRing, store: FleetKeyStore, *, clock: Clock = time.time) -> None:
        self.keyring = keyring
        self._store = store
        self._clock = clock

    async def publish(self) -> None:
        """Adds this executor's public keys (retired, signing, pending) to the fleet's set."""
        now = self._clock()
        await self._store.publish(
            [key.jwk() for key in self.keyring.public_keys()], until=now + self.keyring.retain_s, now=now)

    async def jwks(self) -> Jwks:
        """This executor's keys, then every other executor's that is still published."""
        own = self.keyring.jwks()["keys"]
        try:
            fleet = await self._store.read(now=self._clock())
        except Unavailable as exc:
            log.warning("serving this executor's keys only: %s", exc.message)
            return {"keys": own}
        kids = {key["kid"] for key in own}
        return {"keys": [*own, *(key for key in fleet if key.get("kid") not in kids)]}
