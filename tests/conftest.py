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
    url = harness.test_database_url()
    if url:
        yield url
        return
    pg = embedded.start_postgres(data_root / "pg", database="postgres")
    yield pg.url
    pg.stop()


@pytest.fixture(scope="session")
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A database of its own for this test run, dropped at the end."""
    with harness.scratch_database(postgres_server_url, "corral_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url(data_root: Path) -> Iterator[str]:
    url = harness.test_redis_url()
    if url:
        yield url
        return
    server = embedded.start_redis(data_root / "redis")
    yield server.url
    server.stop()


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    """Fresh ports, data dir and Redis prefix for each test; the database is shared per run."""
    return harness.make_settings(database_url, redis_url, tmp_path)


@pytest_asyncio.fixture
async def start_services(settings: Settings) -> AsyncIterator[StartServices]:
    """`hosts = await start_services("registry", "router")` starts real servers on the
    settings' ports; they are stopped (last started, first stopped) after the test."""
    hosts: dict[str, ServiceHost] = {}

    async def start(*names: str) -> dict[str, ServiceHost]:
        for name in names:
            hosts[name] = await harness.start_service(name, settings)
        return hosts

    yield start
    for host in reversed(list(hosts.values())):
        await host.stop(grace=0.5)
