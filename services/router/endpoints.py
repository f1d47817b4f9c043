"""The router's view of endpoints: a cache fed by the registry's watch stream, so a change lands
on every router within milliseconds and resolving needs no call on the hot path."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from corral import names
from corral.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.endpoint_watch import follow_endpoints
from services.router.routing import Share


@dataclass(frozen=True)
class EndpointView:
    agent: str
    endpoint: str
    salt: str
    revision: int
    shares: tuple[Share, ...]


def view_of(pb: registry_pb2.Endpoint) -> EndpointView:
    agent, endpoint = names.parse_endpoint(pb.name)
    shares = tuple(
        Share(names.parse_version(t.version).number, round(t.percent * 100)) for t in pb.traffic
    )
    return EndpointView(agent, endpoint, pb.salt, pb.revision, shares)


class EndpointCache:
    def __init__(self, stub: registry_pb2_grpc.RegistryServiceStub) -> None:
        self.stub = stub
        self._views: dict[tuple[str, str], EndpointView] = {}
        self._task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()
        # When each change was applied (monotonic), for propagation measurements.
        self.applied_at: dict[tuple[str, str, int], float] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def apply(self, pb: registry_pb2.Endpoint) -> EndpointView:
        view = view_of(pb)
        key = (view.agent, view.endpoint)
        current = self._views.get(key)
        if current is None or view.revision >= current.revision:
            self._views[key] = view
            if len(self.applied_at) > 10_000:
                self.applied_at.clear()
            self.applied_at[(view.agent, view.endpoint, view.revision)] = time.monotonic()
            return view
        return current

    def cached(self, agent: str, endpoint: str) -> EndpointView | None:
        return self._views.get((agent, endpoint))

    async def get(self, agent: str, endpoint: str) -> EndpointView:
        """The cached endpoint; on a miss (an endpoint created a moment ago, or the watch still
        connecting) it is read from the registry."""
        view = self._views.get((agent, endpoint))
        if view is not None:
            return view
        pb = await self.stub.GetEndpoint(
            registry_pb2.GetEndpointRequest(name=names.endpoint_name(agent, endpoint))
        )
        return self.apply(pb)

    async def _watch_forever(self) -> None:
        await follow_endpoints(self.stub, self._on_message, self.synced.clear)

    async def _on_message(self, msg: registry_pb2.WatchEndpointsResponse) -> None:
        if msg.snapshot:
            seen = set()
            for ep in msg.endpoints:
                view = self.apply(ep)
                seen.add((view.agent, view.endpoint))
            for key in set(self._views) - seen:
                del self._views[key]
            self.synced.set()
        else:
            for ep in msg.endpoints:
                self.apply(ep)
