"""The `registry` fixture: a real registry server on the run's PostgreSQL, and a client with
an agent of the test's own."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from corral.registry.v1 import registry_pb2_grpc
from tests import harness
from tests.credentials import public_channel
from tests.registry_client import Registry


@pytest_asyncio.fixture
async def registry(
    services: harness.Platform, tmp_path: Path
) -> AsyncIterator[Registry]:
    await services.start("registry")
    async with public_channel(services.settings.addrs["registry"]) as channel:
        # The database is shared by the whole run: an agent of its own keeps each test apart.
        yield Registry(
            services.settings,
            registry_pb2_grpc.RegistryServiceStub(channel),
            tmp_path,
            f"a-{uuid.uuid4().hex[:10]}",
        )
