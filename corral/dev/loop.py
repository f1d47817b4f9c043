"""corral dev's loop: publish a directory, point an endpoint at the version, and again on every
change to the directory (unchanged bytes publish nothing, a failed build leaves the endpoint
where it was), with a tail of the served version's output running beside the watcher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from corral import names
from corral.dev.watch import Snapshot, changes, scan


class DevFailure(Exception):
    """A build, publish or routing that failed; the message says what and, where it can, what
    to change. The loop reports it and carries on watching."""


@dataclass(frozen=True)
class Build:
    """The directory packed and checked as the registry will check it."""

    data: bytes
    digest: str
    agent: str  # as agent.toml names it


class DevPlatform(Protocol):
    """What the loop needs of the platform (and of the directory): the CLI's implementation
    packs as `corral publish` does and calls the registry."""

    async def build(self) -> Build: ...

    async def publish(self, build: Build) -> names.VersionRef: ...

    async def route(self, endpoint: names.EndpointRef, version: names.VersionRef) -> None: ...


# Runs for as long as `version` is the one served, and is cancelled when another takes its
# place or the loop stops: a tail of the version's logs or traces.
Tail = Callable[[names.VersionRef], Coroutine[Any, Any, None]]
Watch = Callable[[Path, Snapshot], AsyncIterator[tuple[str, ...]]]


async def no_tail(version: names.VersionRef) -> None:
    """Tails nothing."""


# -- what the loop reports, one event per line of output -------------------------------------


@dataclass(frozen=True)
class Watching:
    directory: Path
    endpoint: str


@dataclass(frozen=True)
class Changed:
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Published:
    version: names.VersionRef
    digest: str


@dataclass(frozen=True)
class Routed:
    endpoint: names.EndpointRef
    version: names.VersionRef


@dataclass(frozen=True)
class Unchanged:
    """The directory's bytes are those of the version already served: nothing was published."""

    version: names.VersionRef


@dataclass(frozen=True)
class Failed:
    message: str
    serving: names.VersionRef | None  # where the endpoint stays


DevEvent = Watching | Changed | Published | Routed | Unchanged | Failed
Report = Callable[[DevEvent], None]


@dataclass(frozen=True)
class Served:
    """The version the endpoint was last sent to, and the digest of its bytes."""

    version: names.VersionRef
    digest: str


class DevLoop:
    """One `corral dev`: `run` publishes, then republishes on each change until cancelled (or,
    in tests, until `watch` ends). `agent` pins the agent; by default it is the one agent.toml
    names at the first good build, and a later agent.toml naming another is refused."""

    def __init__(
        self, directory: Path, endpoint: str, platform: DevPlatform, report: Report, *,
        agent: str | None = None, tail: Tail = no_tail, watch: Watch = changes,
    ) -> None:
        self.directory = directory
        self.endpoint = endpoint
        self.agent = agent
        self._platform = platform
        self._report = report
        self._tail = tail
        self._watch = watch
        self.served: Served | None = None
        self._tailing: asyncio.Task[None] | None = None

    async def run(self) -> None:
        since = scan(self.directory)
        async with asyncio.TaskGroup() as group:
            self._report(Watching(self.directory, self.endpoint))
            await self._republish(group)
            async for paths in self._watch(self.directory, since):
                self._report(Changed(paths))
                await self._republish(group)
            if self._tailing is not None:
                self._tailing.cancel()

    async def _republish(self, group: asyncio.TaskGroup) -> None:
        serving = self.served.version if self.served else None
        try:
            served = await self._publish()
        except DevFailure as exc:
            self._report(Failed(str(exc), serving))
            return
        if served is None:
            assert serving is not None
            self._report(Unchanged(serving))
            return
        self.served = served
        if self._tailing is not None:
            self._tailing.cancel()
        self._tailing = group.create_task(self._tail_until_replaced(served.version))

    async def _publish(self) -> Served | None:
        """The version now served, or None when the bytes are those already served."""
        build = await self._platform.build()
        if self.agent is None:
            self.agent = build.agent
        elif build.agent != self.agent:
            raise DevFailure(
                f"agent.toml: name: is {build.agent!r}, but this dev loop publishes "
                f"{self.agent!r}; put the name back, or stop and start corral dev again")
        if self.served is not None and build.digest == self.served.digest:
            return None
        version = await self._platform.publish(build)
        self._report(Published(version, build.digest))
        endpoint = names.EndpointRef(self.agent, self.endpoint)
        await self._platform.route(endpoint, version)
        self._report(Routed(endpoint, version))
        return Served(version, build.digest)

    async def _tail_until_replaced(self, version: names.VersionRef) -> None:
        # A tail that fails is reported and ends; the watcher goes on.
        try:
            await self._tail(version)
        except Exception as exc:  # noqa: BLE001 - reported, and the loop carries on
            self._report(Failed(f"the tail of {version.name} stopped: {exc}", version))
