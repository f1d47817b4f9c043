"""Wires the router: its clients, the endpoint mirror and its watch, the domain, the servicer."""

from __future__ import annotations

from contextlib import AsyncExitStack

import grpc

from corral.router.v1 import router_pb2, router_pb2_grpc
from services.common.endpoints import EndpointMirror
from services.common.fleet import FleetView
from services.common.server import App
from services.common.settings import Settings
from services.router.clients import RouterClients
from services.router.placing import Placement
from services.router.router import Router
from services.router.servicer import RouterServicer

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


class RouterService(App):
    # The domain, once started.
    router: Router | None = None

    async def start(self, server: grpc.aio.Server, stack: AsyncExitStack) -> list[str]:
        clients = RouterClients.open(self.settings, stack)
        endpoints = EndpointMirror(
            clients.registry.endpoints(), on_invalidated=clients.registry.forget_removed)
        endpoints.start()
        stack.push_async_callback(endpoints.close)
        fleet = FleetView(clients.fleet.members, on_change=clients.executors.fleet_changed)
        await fleet.refresh()  # one look before serving: a first turn need not wait a second
        fleet.start()
        stack.push_async_callback(fleet.close)
        self.router = Router(
            clients.sessions,
            clients.registry,
            clients.executors,
            endpoints,
            self.settings.executor.max_payload_bytes,
            Placement(fleet, clients.sessions),
        )
        router_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(self.router), server)
        return [SERVICE_NAME]


def build(settings: Settings) -> RouterService:
    return RouterService(settings)
