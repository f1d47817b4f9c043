"""Wires the registry: pool, migrations, store, the calls out (telemetry, sessions, the executor's
start check), the domains and their servicers, the rollout controller, the endpoint-change
listener, the metrics exporter."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import grpc

from corral.registry.v1 import (
    keys_pb2,
    keys_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    rollouts_pb2,
    rollouts_pb2_grpc,
    tools_pb2,
    tools_pb2_grpc,
)
from services.common.auth.key_client import CachedKeyVerifier
from services.common.auth.principal import Principal
from services.common.auth.verify import CredentialVerifier
from services.common.background import Periodic
from services.common.db import create_pool, migrate
from services.common.errors import Unavailable
from services.common.outbound import OutboundPolicy
from services.common.prometheus import RefreshedSnapshot
from services.common.server import App
from services.common.settings import Settings
from services.registry.bootstrap import ensure_admin_key
from services.registry.clients import ExecutorClient, SessionsClient, TelemetryClient
from services.registry.controller import RolloutController
from services.registry.experiments import Experiments
from services.registry.key_servicer import KeyServicer
from services.registry.keys import Keys
from services.registry.lifecycle import Lifecycle
from services.registry.prometheus import rollout_snapshot
from services.registry.publishing import Publishing
from services.registry.registry import Registry
from services.registry.rollout_servicer import RolloutServicer
from services.registry.rollouts import Rollouts
from services.registry.secrets import secret_box
from services.registry.servicer import RegistryServicer
from services.registry.store import PgStore
from services.registry.tool_secrets_servicer import ToolSecretsServicer
from services.registry.tool_servicer import ToolServicer
from services.registry.tools import Tools
from services.registry.webhooks import WebhookNotifier

MIGRATIONS = Path(__file__).parent / "migrations"
# Retention looks for versions to delete hourly, the first time a minute after start.
RETENTION_EVERY_S = 3600.0
RETENTION_FIRST_S = 60.0
SERVICES = [
    registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
    rollouts_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name,
    tools_pb2.DESCRIPTOR.services_by_name["ToolService"].full_name,
    tools_pb2.DESCRIPTOR.services_by_name["ToolSecretsService"].full_name,
    keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
]


class RegistryService(App):
    # The domain, once started.
    registry: Registry | None = None
    # Deleting and retention, once started.
    lifecycle: Lifecycle | None = None
    # API keys, once started: the registry's own API-key verifier.
    keys: Keys | None = None

    async def start(self, server: grpc.aio.Server, stack: AsyncExitStack) -> list[str]:
        pool = await create_pool(self.settings.require_database(), self.settings.pools)
        stack.push_async_callback(pool.close)
        await migrate(pool, "registry", MIGRATIONS)
        store = PgStore(pool)
        outbound = OutboundPolicy(self.settings.outbound_allow)
        notifier = WebhookNotifier(outbound, store.webhook_url)
        stack.push_async_callback(notifier.close)
        telemetry = TelemetryClient(self.settings)
        stack.push_async_callback(telemetry.close)
        sessions = SessionsClient(self.settings)
        stack.push_async_callback(sessions.close)
        executor = ExecutorClient(self.settings)
        stack.push_async_callback(executor.close)

        rollouts = Rollouts(store, notifier, sessions, outbound=outbound)
        experiments = Experiments(store, notifier, telemetry, outbound=outbound)
        publishing = Publishing(store, executor, self.settings.start_check)
        registry = Registry(store, rollouts, publishing)
        self.lifecycle = lifecycle = Lifecycle(store, sessions, retention_days=self.settings.version_retention_days)
        retention = Periodic(lifecycle.retention_step, every_s=RETENTION_EVERY_S,
                             what="version retention", first_delay_s=RETENTION_FIRST_S)
        retention.start()
        stack.push_async_callback(retention.close)
        await registry.start_watching()
        stack.push_async_callback(registry.stop_watching)
        self.registry = registry
        controller = RolloutController(store, rollouts, experiments, telemetry)
        rollouts.kick = controller.wake
        controller.start()
        stack.push_async_callback(controller.stop)
        if self.settings.metrics_ports.get("registry"):
            rollout_metrics = RefreshedSnapshot(rollout_snapshot(store))
            self.metrics.register(rollout_metrics)
            rollout_metrics.start()
            stack.push_async_callback(rollout_metrics.close)
        tools = Tools(store, secret_box(self.settings.secrets_key), outbound)
        self.keys = keys = Keys(store)
        if self.settings.bootstrap_admin_key_file is not None:
            await ensure_admin_key(keys, self.settings.bootstrap_admin_key_file)

        registry_pb2_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(registry, lifecycle), server)
        rollouts_pb2_grpc.add_RolloutServiceServicer_to_server(
            RolloutServicer(rollouts, experiments), server)
        tools_pb2_grpc.add_ToolServiceServicer_to_server(ToolServicer(tools), server)
        tools_pb2_grpc.add_ToolSecretsServiceServicer_to_server(
            ToolSecretsServicer(tools), server)
        keys_pb2_grpc.add_KeyServiceServicer_to_server(KeyServicer(keys), server)
        return SERVICES

    async def drain(self) -> None:
        if self.registry is not None:
            await self.registry.stop_watching()

    def key_verifier(self) -> CredentialVerifier:
        """The registry checks API keys against its own store, caching answers as every service
        does (the host asks for this before start)."""
        return CachedKeyVerifier(_OwnKeys(self), self.settings.credential_cache_s)


class _OwnKeys:
    """The registry's Keys, once it has started."""

    def __init__(self, app: RegistryService) -> None:
        self._app = app

    async def verify(self, credential: str) -> Principal:
        if self._app.keys is None:
            raise Unavailable("the registry is starting; retry in a moment")
        return await self._app.keys.verify(credential)


def build(settings: Settings) -> RegistryService:
    return RegistryService(settings)
