"""Wires the registry: pool, migrations, store, domain, servicer, endpoint-change listener."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import grpc

from corral.registry.v1 import (
    registry_pb2,
    registry_pb2_grpc,
    rollouts_pb2,
    rollouts_pb2_grpc,
    tools_pb2,
    tools_pb2_grpc,
)
from services.common.db import create_pool, migrate
from services.common.prometheus import MetricsExporter
from services.common.server import Service
from services.common.settings import Settings
from services.registry.clients import SessionPolicies, TelemetryAnalysis, TelemetryExperiments
from services.registry.controller import RolloutController
from services.registry.experiments import Experiments
from services.registry.prometheus import rollout_snapshot
from services.registry.registry import Registry
from services.registry.rollout_servicer import RolloutServicer
from services.registry.rollout_store import RolloutStore
from services.registry.rollouts import Rollouts
from services.registry.secrets import secret_box
from services.registry.servicer import RegistryServicer
from services.registry.store import RegistryStore
from services.registry.tool_servicer import Tools, ToolSecretsServicer, ToolServicer
from services.registry.tool_store import ToolStore
from services.registry.webhooks import WebhookNotifier

MIGRATIONS = Path(__file__).parent / "migrations"


class RegistryService(Service):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry: Registry | None = None

    async def start(self, server: grpc.aio.Server, stack: AsyncExitStack) -> list[str]:
        pool = await create_pool(self.settings.require_database())
        stack.push_async_callback(pool.close)
        await migrate(pool, "registry", MIGRATIONS)
        store = RegistryStore(pool)
        notifier = WebhookNotifier(store.webhook_url)
        stack.push_async_callback(notifier.close)
        rollouts = Rollouts(store, RolloutStore(), notifier)
        registry = Registry(store, rollouts)
        await registry.start_watching()
        stack.push_async_callback(registry.stop_watching)
        self.registry = registry
        analysis = TelemetryAnalysis(self.settings)
        stack.push_async_callback(analysis.close)
        policies = SessionPolicies(self.settings, store)
        stack.push_async_callback(policies.close)
        rollouts.retire = policies.retire
        controller = RolloutController(store, RolloutStore(), rollouts, analysis, policies.after_rollback)
        controller.start()
        stack.push_async_callback(controller.stop)
        exporter = MetricsExporter(self.settings.metrics_ports["registry"], rollout_snapshot(store, RolloutStore()))
        exporter.start()
        stack.push_async_callback(exporter.stop)
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(registry), server)
        experiments = Experiments(store, RolloutStore(), notifier)
        analyze_experiment = TelemetryExperiments(analysis)
        controller.watch_experiments(experiments, analyze_experiment)
        rollouts_pb2_grpc.add_RolloutServiceServicer_to_server(
            RolloutServicer(rollouts, registry, experiments, analyze_experiment), server)
        tools = Tools(ToolStore(pool), secret_box(self.settings.secrets_key))
        tools_pb2_grpc.add_ToolServiceServicer_to_server(ToolServicer(tools), server)
        tools_pb2_grpc.add_ToolSecretsServiceServicer_to_server(
            ToolSecretsServicer(tools, self.settings.internal_token), server)
        return [
            registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
            rollouts_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name,
            tools_pb2.DESCRIPTOR.services_by_name["ToolService"].full_name,
            tools_pb2.DESCRIPTOR.services_by_name["ToolSecretsService"].full_name,
        ]


    async def drain(self) -> None:
        if self.registry is not None:
            await self.registry.stop_watching()


def build(settings: Settings) -> RegistryService:
    return RegistryService(settings)
