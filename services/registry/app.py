"""Wires the registry: pool, migrations, store, domain, servicer, endpoint-change listener."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import grpc

from corral.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.db import create_pool, migrate
from services.common.settings import Settings
from services.registry.registry import Registry
from services.registry.servicer import RegistryServicer
from services.registry.store import RegistryStore

MIGRATIONS = Path(__file__).parent / "migrations"


class RegistryService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry: Registry | None = None

    async def start(self, server: grpc.aio.Server, stack: AsyncExitStack) -> list[str]:
        pool = await create_pool(self.settings.require_database())
        stack.push_async_callback(pool.close)
        await migrate(pool, "registry", MIGRATIONS)
        registry = Registry(RegistryStore(pool))
        await registry.start_watching()
        stack.push_async_callback(registry.stop_watching)
        self.registry = registry
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(registry), server)
        return [registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name]


    async def drain(self) -> None:
        if self.registry is not None:
            await self.registry.stop_watching()


def build(settings: Settings) -> RegistryService:
    return RegistryService(settings)
