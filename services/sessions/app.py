"""Wires the sessions service: PostgreSQL pool and migrations, Redis, store, domain, servicer."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import grpc

from corral.sessions.v1 import fleet_pb2, fleet_pb2_grpc, sessions_pb2, sessions_pb2_grpc
from services.common import db
from services.common.background import Periodic
from services.common.kv import KeySpace, create_redis
from services.common.server import App
from services.common.settings import Settings
from services.sessions.clients import ExecutorSandboxes, RegistryPins
from services.sessions.fleet import Fleet
from services.sessions.fleet_servicer import FleetServicer
from services.sessions.fleet_store import RedisFleet
from services.sessions.requests import SWEEP_EVERY_S, TurnResults
from services.sessions.requests_store import PgTurnResults
from services.sessions.servicer import SessionsServicer
from services.sessions.sessions import Sessions
from services.sessions.store import PgSessionStore, RecordCache, RedisLeases

SERVICE_NAME = sessions_pb2.DESCRIPTOR.services_by_name["SessionsService"].full_name
FLEET_SERVICE_NAME = fleet_pb2.DESCRIPTOR.services_by_name["FleetService"].full_name


class SessionsApp(App):
    async def start(self, server: grpc.aio.Server, stack: AsyncExitStack) -> list[str]:
        database_url = self.settings.require_database()
        redis_url = self.settings.require_redis()
        pool = await db.create_pool(database_url, self.settings.pools)
        stack.push_async_callback(pool.close)
        await db.migrate(pool, "sessions", Path(__file__).parent / "migrations")
        client = create_redis(redis_url, self.settings.pools)
        stack.push_async_callback(client.aclose)
        keys = KeySpace(self.settings.redis_prefix)
        pins = RegistryPins(self.settings)
        stack.push_async_callback(pins.close)
        executor = ExecutorSandboxes(self.settings)
        stack.push_async_callback(executor.close)
        fleet = RedisFleet(client, keys)
        store = PgSessionStore(pool, RecordCache(client, keys))
        sessions = Sessions(
            store, RedisLeases(client, keys), pins=pins, sandboxes=executor, fleet=fleet,
            fleet_sandboxes=executor,
        )
        results = TurnResults(PgTurnResults(pool), store, self.settings.request_retention_s)
        sweep = Periodic(results.sweep, every_s=SWEEP_EVERY_S, what="turn results sweep")
        sweep.start()
        stack.push_async_callback(sweep.close)
        sessions_pb2_grpc.add_SessionsServiceServicer_to_server(
            SessionsServicer(sessions, results), server
        )
        fleet_pb2_grpc.add_FleetServiceServicer_to_server(FleetServicer(Fleet(fleet)), server)
        return [SERVICE_NAME, FLEET_SERVICE_NAME]


def build(settings: Settings) -> SessionsApp:
    return SessionsApp(settings)
