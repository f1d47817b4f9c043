"""Committed endpoint changes and deletions, from PostgreSQL's notifications to every watch stream, kept alive
across connection losses.

Notifications travel on one connection that LISTENs. When that connection is lost (PostgreSQL
restarted, a network fault, a proxy dropping it) notifications sent meanwhile are gone, so the
feed ends every open watch stream with UNAVAILABLE (a router then says it is not synced) and holds
new ones until it LISTENs again on a new connection; the first thing a new stream gets is a
snapshot read after that, so nothing changed during the loss is missed. A loss is seen at once
when the connection closes, and within `probe_s` when it silently stops answering."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol

from corral.names import EndpointRef, ToolRef, VersionRef
from services.common.background import Backoff, TaskSet
from services.common.endpoints import EndpointKey, ToolKey, VersionKey
from services.common.errors import Unavailable
from services.registry.model import EndpointListener

log = logging.getLogger(__name__)

PROBE_S = 2.0
RELISTEN = Backoff(first_s=0.1, max_s=1.0)


class ListensForEndpoints(Protocol):
    async def listen_endpoints(
        self,
        on_change: Callable[[str], None],
        on_deletion: Callable[[str], None],
        on_lost: Callable[[], None],
    ) -> EndpointListener: ...


class _Lost:
    """Put in a stream's queue when the notifications stopped."""


_STOP = None
_LOST = _Lost()
# What changed: an endpoint, a deleted version, a changed or deleted tool, or the digest of a
# collected bundle.
Change = EndpointKey | VersionKey | ToolKey | str
Item = Change | _Lost | None


class Changes:
    """One watch stream's view of the feed."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Item] = asyncio.Queue()

    def put(self, item: Item) -> None:
        self._queue.put_nowait(item)

    async def next(self) -> Change | None:
        """The next change; None when the registry is stopping. Raises Unavailable when
        changes may have been missed."""
        item = await self._queue.get()
        if isinstance(item, _Lost):
            raise Unavailable(
                "the registry lost its PostgreSQL connection for endpoint changes; watch again "
                "to get the current endpoints",
                reason="WATCH_INTERRUPTED",
            )
        return item


class EndpointFeed:
    def __init__(
        self, store: ListensForEndpoints, *, probe_s: float = PROBE_S, backoff: Backoff = RELISTEN
    ) -> None:
        self._store = store
        self._probe_s = probe_s
        self._backoff = backoff
        self._streams: set[Changes] = set()
        self._listener: EndpointListener | None = None
        self._lost = asyncio.Event()
        self.live = asyncio.Event()
        self._stopped = False
        self._tasks = TaskSet("endpoint feed")

    async def start(self) -> None:
        """LISTENs (raising if PostgreSQL cannot be reached: the registry does not start
        without it), then keeps listening in the background."""
        self._listener = await self._listen()
        self.live.set()
        self._tasks.spawn(self._keep_listening())

    async def stop(self) -> None:
        await self._tasks.close()
        self._stopped = True
        self.live.set()  # lets streams held for a listener go, to be told the registry stops
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        for stream in self._streams:
            stream.put(_STOP)

    @asynccontextmanager
    async def subscription(self) -> AsyncIterator[Changes]:
        """A stream's changes from now on; entered only while notifications flow, so a snapshot
        read inside is current."""
        await self.live.wait()
        if self._stopped:
            raise Unavailable("the registry is stopping; watch another replica or again later")
        changes = Changes()
        self._streams.add(changes)
        try:
            yield changes
        finally:
            self._streams.discard(changes)

    def _on_change(self, payload: str) -> None:
        tenant, agent, endpoint, _revision = payload.split("/")
        for stream in self._streams:
            stream.put((tenant, EndpointRef(agent, endpoint)))

    def _on_deletion(self, payload: str) -> None:
        kind, _, what = payload.partition("/")
        change: VersionKey | ToolKey | str
        if kind == "version":
            tenant, agent, number = what.split("/")
            change = (tenant, VersionRef(agent, int(number)))
        elif kind == "tool":
            tenant, tool = what.split("/")
            change = (tenant, ToolRef(tool))
        else:
            change = what  # a bundle's digest
        for stream in self._streams:
            stream.put(change)

    async def _listen(self) -> EndpointListener:
        self._lost = asyncio.Event()
        return await self._store.listen_endpoints(self._on_change, self._on_deletion, self._lost.set)

    async def _keep_listening(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), self._probe_s)
            except TimeoutError:
                if self._listener is not None and await self._listener.alive():
                    continue
            await self._relisten()

    async def _relisten(self) -> None:
        self.live.clear()
        log.warning("lost the PostgreSQL connection carrying endpoint changes; watch streams end "
                    "until it is back")
        for stream in self._streams:
            stream.put(_LOST)
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        wait = self._backoff.first_s
        while True:
            try:
                self._listener = await self._listen()
            except Exception as exc:  # noqa: BLE001 - whatever the store raised, try again
                log.warning("cannot LISTEN for endpoint changes yet (%s); again in %.1fs", exc, wait)
                await asyncio.sleep(wait)
                wait = self._backoff.after(wait)
                continue
            self.live.set()
            log.info("listening for endpoint changes again")
            return
