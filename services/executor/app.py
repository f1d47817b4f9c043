"""Wires the executor: clients to sessions, registry and telemetry, the driver, the broker."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack

import grpc

from corral.executor.v1 import executor_pb2, executor_pb2_grpc
from services.common.settings import Settings
from services.executor.broker import ModelBroker, ScriptedProvider
from services.executor.drivers import driver_for
from services.executor.drivers.cgroups import remove_orphans
from services.executor.executor import Executor, default_holder
from services.executor.metrics import ExecutorMetrics
from services.executor.pools import EndpointWatch
from services.executor.servicer import ExecutorServicer
from services.executor.store import BundleCache, SessionsClient, SpanForwarder

log = logging.getLogger(__name__)


class ExecutorService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def start(self, server: grpc.aio.Server, stack: AsyncExitStack) -> list[str]:
        s = self.settings
        driver = driver_for(s.executor.sandbox_driver)
        hierarchy = getattr(driver, "hierarchy", None)
        if hierarchy is not None:
            # What a crashed predecessor left behind: its sandboxes' cgroups (their processes
            # died with it, bwrap's --die-with-parent).
            removed = remove_orphans(hierarchy)
            if removed:
                log.warning("removed %d sandbox cgroups left by a crashed executor", removed)
        log.info("sandbox driver: %s", driver.name)
        sessions = SessionsClient(s)
        stack.push_async_callback(sessions.close)
        bundles = BundleCache(s, s.data_dir / "bundles")
        stack.push_async_callback(bundles.close)
        spans = SpanForwarder(s)
        stack.push_async_callback(spans.close)
        metrics = ExecutorMetrics()
        executor = Executor(
            s.executor, s.data_dir, driver, sessions, bundles, spans,
            ModelBroker({"scripted": ScriptedProvider()}), default_holder(s.listen["executor"]),
            metrics,
        )
        executor.start()
        stack.push_async_callback(executor.close)
        if executor.pools is not None:
            watch = EndpointWatch(bundles.stub, executor.pools)
            watch.start()
            stack.push_async_callback(watch.close)
        executor_pb2_grpc.add_ExecutorServiceServicer_to_server(ExecutorServicer(executor), server)
        return [executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name]


def build(settings: Settings) -> ExecutorService:
    return ExecutorService(settings)
