"""Fixtures: a fresh PostgreSQL database and Redis for the run — the machine's when
CORRAL_TEST_DATABASE_URL / CORRAL_TEST_REDIS_URL are set, embedded ones otherwise."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.common import embedded
from services.common.server import ServiceHost
from services.common.settings import Settings
from tests import harness
from tests.mesh import Mesh, connect

StartServices = Callable[..., Awaitable[dict[str, ServiceHost]]]


@pytest.fixture(scope="session")
def data_root() -> Iterator[Path]:
    """Where embedded PostgreSQL and Redis live for the run: outside pytest's rotated temp
    folders, which a concurrent pytest run may delete under a running database."""
    root = Path(tempfile.mkdtemp(prefix="corral-test-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server_url(data_root: Path) -> Iterator[str]:
    """A URL of a PostgreSQL server (any database on it) where test databases can be created."""
    with harness.machine_or_embedded(
        "CORRAL_TEST_DATABASE_URL",
        lambda: embedded.start_postgres(data_root / "pg", database="postgres"),
    ) as url:
        yield url


@pytest.fixture(scope="session")
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A database of its own for this test run, dropped at the end."""
    with harness.scratch_database(postgres_server_url, "corral_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url(data_root: Path) -> Iterator[str]:
    """A URL of a Redis server; each test keeps to a key prefix of its own."""
    with harness.machine_or_embedded(
        "CORRAL_TEST_REDIS_URL", lambda: embedded.start_redis(data_root / "redis")
    ) as url:
        yield url


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    """Port 0 for every service, a data dir and Redis prefix of each test's own; the database is
    shared per run. Where started services serve is in `services.settings`, not here."""
    return harness.make_settings(database_url, redis_url, tmp_path)


@pytest_asyncio.fixture
async def services(settings: Settings) -> AsyncIterator[harness.Platform]:
    """`await services.start("registry", "router")` starts real servers on ports the OS picks;
    `services.settings` say where they serve. They are stopped (last started, first stopped)
    after the test."""
    platform = harness.Platform(settings)
    yield platform
    await platform.stop()


@pytest.fixture
def start_services(services: harness.Platform) -> StartServices:
    """`hosts = await start_services("registry", "router")`: `services.start`, for a test that
    needs the hosts but not their addresses."""
    return services.start


@pytest_asyncio.fixture
async def mesh(services: harness.Platform, tmp_path: Path) -> AsyncIterator[Mesh]:
    """All five services started, and a client's stubs to them with a tenant and an agent prefix
    of this test's own."""
    hosts = await services.start(*harness.MESH)
    async with connect(services.settings, hosts, tmp_path) as m:
        yield m
