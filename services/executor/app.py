"""Wires the executor: clients to sessions, registry and telemetry, the driver, the model and tool
brokers, invocation credentials (keys on local disk, the deny-list in Redis), warm pools, and the
HTTP port (/metrics, /.well-known/jwks.json, revocations)."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack

import grpc

from corral.executor.v1 import executor_pb2, executor_pb2_grpc
from services.common import tracing
from services.common.export_buffer import ExportBuffer
from services.common.fleet import EXECUTOR_NAME, FleetView
from services.common.fleet_client import FleetClient
from services.common.kv import create_redis
from services.common.outbound import OutboundPolicy
from services.common.server import App
from services.common.settings import Settings, SettingsError
from services.executor.broker import ModelBroker, check_provider_urls, providers_from_settings
from services.executor.bundles import BundleCache
from services.executor.clients import (
    RegistryClient,
    RegistryToolResolver,
    SessionsClient,
    TelemetryDeliverySink,
    TelemetryLogs,
    TelemetrySpans,
)
from services.executor.credentials import CredentialIssuer
from services.executor.delivery import (
    BufferedSpanExporter,
    DropLog,
    SpillDir,
    TelemetryDelivery,
    exporter_name,
)
from services.executor.drivers import driver_for
from services.executor.executor import Executor
from services.executor.fleet_keys import FleetKeys
from services.executor.http import ExecutorHttp
from services.executor.identity import executor_name, instance_id
from services.executor.keys import KeyRing, rotation
from services.executor.membership import Membership, WarmShare
from services.executor.metrics import ExecutorMetrics
from services.executor.pools import EndpointWants
from services.executor.servicer import ExecutorServicer
from services.executor.starter import SandboxStarter
from services.executor.store import RedisJwks, RedisRevocations
from services.executor.tool_transport import ToolTransport
from services.executor.tools import ToolBroker

log = logging.getLogger(__name__)
SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name


class ExecutorService(App):
    # The domain, once started.
    executor: Executor | None = None
    membership: Membership | None = None

    async def start(self, server: grpc.aio.Server, stack: AsyncExitStack) -> list[str]:
        s = self.settings
        # The model server is the operator's setting: a forbidden one stops the start, first.
        outbound = OutboundPolicy(s.outbound_allow)
        provider_env = {
            "CORRAL_OPENAI_BASE_URL": s.executor.openai_base_url,
            "CORRAL_OPENAI_API_KEY": s.executor.openai_api_key,
        }
        await check_provider_urls(provider_env, outbound)
        driver = driver_for(s.executor.sandbox_driver)
        # What a crashed predecessor left behind: its sandboxes' cgroups (their processes died
        # with it: bwrap's --die-with-parent, runsc's --attached) and gVisor's state directories.
        removed = driver.remove_orphans()
        if removed:
            log.warning("removed %d sandboxes' remains left by a crashed executor", removed)
        log.info("sandbox driver: %s", driver.name)
        sessions = SessionsClient(s)
        stack.push_async_callback(sessions.close)
        registry = RegistryClient(s)
        stack.push_async_callback(registry.close)
        metrics = ExecutorMetrics(s.model_prices, self.metrics)
        # Its leases are held in its fleet name: a restarted executor is the same holder.
        holder = executor_name(s.executor.name, s.data_dir)
        if not EXECUTOR_NAME.match(holder):
            raise SettingsError(
                f"CORRAL_EXECUTOR_NAME={holder!r} is not an executor name: lower-case letters, "
                "digits, '-' and '.', at most 100"
            )
        delivery = await self._delivery(holder, metrics, stack)
        spans = TelemetrySpans(delivery, enabled=s.tracing)
        logs = TelemetryLogs(delivery)
        broker = ModelBroker(providers_from_settings(provider_env, outbound), metrics=metrics)
        stack.push_async_callback(broker.aclose)
        tools = ToolBroker(
            resolver=RegistryToolResolver(s), transport=ToolTransport.from_settings(s),
            cache_ttl_s=s.credential_cache_s, metrics=metrics,
        )
        stack.push_async_callback(tools.close)
        redis = create_redis(s.require_redis(), s.pools)
        stack.push_async_callback(redis.aclose)
        rotation_s = s.executor.key_rotation_hours * 3600
        # Retired public keys stay published for two days: longer than any token they signed.
        keyring = KeyRing(s.data_dir / "keys", rotation_s, retain_s=max(rotation_s, 2 * 86_400))
        fleet_keys = FleetKeys(keyring, RedisJwks(redis, s.redis_prefix))
        await fleet_keys.publish()  # before any token it signs can reach a tool
        rotating = rotation(keyring, publish=fleet_keys.publish)
        rotating.start()
        stack.push_async_callback(rotating.close)
        issuer = CredentialIssuer(
            keyring, RedisRevocations(redis, s.redis_prefix), issuer=f"executor@{holder}",
            fleet=fleet_keys,
        )
        starter = SandboxStarter(
            driver, BundleCache(registry, s.data_dir / "bundles"), s.data_dir / "sandboxes",
            s.executor.python, metrics, max_sandboxes=s.executor.max_live_sandboxes,
            max_starting=s.executor.max_starting, start_queue=s.executor.start_queue,
        )
        executor = Executor(
            s.executor, starter, sessions, spans, broker, holder, credentials=issuer, tools=tools,
            logs=logs,
        )
        executor.start()
        stack.push_async_callback(executor.close)
        self.executor = executor
        fleet = FleetClient(s)
        stack.push_async_callback(fleet.close)
        self.membership = Membership(
            fleet, name=holder, instance_id=instance_id(), driver=driver.name,
            capacity=s.executor.max_live_sandboxes, load=executor,
        )
        stack.push_async_callback(self.membership.close)
        if executor.pools is not None:
            share = WarmShare(holder, s.executor.warm_pool_replicas, executor.pools.wake)
            executor.pools.keeps = share.keeps
            view = FleetView(fleet.members, on_change=share.fleet_changed)
            view.start()
            stack.push_async_callback(view.close)
        watch = EndpointWants(registry, executor.pools, on_invalidated=executor.forget_stale)
        watch.start()
        stack.push_async_callback(watch.close)
        if s.executor.http_port:
            http = ExecutorHttp(issuer, metrics.registry, "0.0.0.0", s.executor.http_port)
            await http.start()
            stack.push_async_callback(http.close)
        executor_pb2_grpc.add_ExecutorServiceServicer_to_server(ExecutorServicer(executor), server)
        return [SERVICE_NAME]

    async def _delivery(
        self, holder: str, metrics: ExecutorMetrics, stack: AsyncExitStack
    ) -> TelemetryDelivery:
        """Spans (the executor's own, through the tracer's relay, and the agents') and log records
        to telemetry through a buffer spilling under CORRAL_DATA_DIR/telemetry-buffer."""
        spill = SpillDir(self.settings.data_dir / "telemetry-buffer", holder)
        stack.callback(spill.release)
        spill_dir = spill.path
        buffer = ExportBuffer(self.settings.executor.telemetry_buffer, spill_dir,
                              DropLog(metrics.count_telemetry_dropped))
        metrics.telemetry_held.set_function(lambda: len(buffer))
        sink = TelemetryDeliverySink(self.settings)
        stack.push_async_callback(sink.close)
        delivery = TelemetryDelivery(buffer, sink, exporter_name(holder, spill_dir))
        delivery.start()
        stack.push_async_callback(delivery.close)
        tracing.export_spans_through(BufferedSpanExporter(delivery))
        stack.callback(tracing.export_spans_through, None)
        return delivery


    def serving(self, address: str, internal_address: str) -> None:
        if self.membership is not None:
            self.membership.serving(self.settings.executor.advertise or internal_address)


def build(settings: Settings) -> ExecutorService:
    return ExecutorService(settings)
