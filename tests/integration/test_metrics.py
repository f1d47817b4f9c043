"""Each service's /metrics as Prometheus scrapes it, all five running on real PostgreSQL and
Redis: an invocation, its model tokens and their cost, a refused tool call, a failed invocation
and the RPCs behind them show under the one label vocabulary, and every metric the dashboards in
deploy/grafana query is on some service's page."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from corral.registry.v1 import registry_pb2 as reg
from services.common.settings import SERVICES, Settings
from services.launcher.ports import HeldPort
from tests import harness
from tests.dashboards import dashboards
from tests.mesh import Mesh, connect
from tests.rpc import fails

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PORTS = {
    "router": "CORRAL_ROUTER_METRICS_PORT", "registry": "CORRAL_REGISTRY_METRICS_PORT",
    "sessions": "CORRAL_SESSIONS_METRICS_PORT", "telemetry": "CORRAL_TELEMETRY_METRICS_PORT",
    "executor": "CORRAL_EXECUTOR_HTTP_PORT",
}
PRICES = {"scripted-1": {"input": 1000.0, "output": 2000.0}}
FAILING = """
from corral.sdk import App, ToolError

app = App()


@app.entrypoint
def run(payload, ctx):
    try:
        ctx.tools.call("billing", {})
    except ToolError as exc:
        yield exc.code
    if payload.get("fail"):
        raise ValueError("asked to fail")
"""


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()  # type: ignore[no-any-return]


class Scrapes:
    """The services' /metrics pages, fetched off the event loop the services run on."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports

    async def page(self, service: str) -> str:
        return await asyncio.to_thread(_get, f"http://127.0.0.1:{self.ports[service]}/metrics")

    async def samples(self, service: str, name: str, **labels: str) -> list[Sample]:
        return [
            s for family in text_string_to_metric_families(await self.page(service))
            for s in family.samples
            if s.name == name and labels.items() <= s.labels.items()
        ]

    async def value(self, service: str, name: str, **labels: str) -> float:
        return sum(s.value for s in await self.samples(service, name, **labels))

    async def families(self) -> set[str]:
        """Every sample name some service's page declares, whether it has samples yet or not."""
        names: set[str] = set()
        for service in SERVICES:
            for family in text_string_to_metric_families(await self.page(service)):
                suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
                names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        return names


@pytest_asyncio.fixture
async def world(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[Mesh, Scrapes]]:
    held: dict[str, HeldPort] = {svc: harness.held_port() for svc in PORTS}
    s = harness.make_settings(
        settings.database_url or "", settings.redis_url or "", tmp_path,
        CORRAL_MODEL_PRICES=json.dumps(PRICES),
        **{PORTS[svc]: str(port.port) for svc, port in held.items()},
    )
    platform = harness.Platform(s)
    try:
        await platform.start(*harness.MESH)
        async with connect(platform.settings, platform.hosts, tmp_path) as mesh:
            yield mesh, Scrapes({svc: port.port for svc, port in held.items()})
    finally:
        for port in held.values():
            port.close()
        await platform.stop()


async def test_an_invocation_shows_on_the_executors_page_under_the_version_labels(world) -> None:
    mesh, scrapes = world
    agent = await mesh.publish_examples()
    await mesh.set_split(agent, "prod", [(1, 100)])
    await mesh.invoke(agent, endpoint="prod", session_id=f"{mesh.prefix}-a")
    await mesh.invoke(agent, endpoint="prod", session_id=f"{mesh.prefix}-b")

    version = {"tenant": mesh.tenant, "agent": agent, "version": "1", "endpoint": "prod"}
    assert await scrapes.value("executor", "corral_invocations_total", **version, code="OK") == 2
    assert await scrapes.value("executor", "corral_invocation_duration_seconds_count", **version) == 2
    # A histogram: buckets Prometheus can add up across executors, the last one holding all.
    buckets = await scrapes.samples("executor", "corral_invocation_duration_seconds_bucket", **version)
    assert len(buckets) > 10 and {"le": "+Inf"}.items() <= buckets[-1].labels.items()
    assert buckets[-1].value == 2
    tokens_in = await scrapes.value("executor", "corral_model_tokens_total", **version, direction="input")
    tokens_out = await scrapes.value("executor", "corral_model_tokens_total", **version, direction="output")
    assert tokens_in > 0 and tokens_out > 0
    cost = await scrapes.value("executor", "corral_model_cost_usd_total", **version, model="scripted-1")
    assert cost == pytest.approx((tokens_in * 1000 + tokens_out * 2000) / 1_000_000)
    # The router counted its RPCs, by method and status code.
    assert await scrapes.value("router", "corral_rpc_server_duration_seconds_count",
                         method="corral.router.v1.RouterService/Invoke", code="OK") == 2


async def test_failures_are_counted_by_their_code(world) -> None:
    mesh, scrapes = world
    agent = await mesh.publish_agent("fails", FAILING)
    await mesh.invoke(agent, {"fail": False}, version="1")
    await fails(grpc.StatusCode.INTERNAL, mesh.invoke(agent, {"fail": True}, version="1"))

    # Called by version, not through an endpoint: the endpoint label is empty.
    version = {"tenant": mesh.tenant, "agent": agent, "version": "1", "endpoint": ""}
    assert await scrapes.value("executor", "corral_invocations_total", **version, code="OK") == 1
    assert await scrapes.value("executor", "corral_invocations_total", **version, code="AGENT_ERROR") == 1
    assert await scrapes.value("executor", "corral_tool_calls_total", **version, tool="billing",
                         code="PERMISSION_DENIED") == 2
    assert await scrapes.value("router", "corral_rpc_server_duration_seconds_count",
                         method="corral.router.v1.RouterService/Invoke", code="INTERNAL") == 1
    # A name nobody has: NOT_FOUND on the registry's page, not UNKNOWN.
    await fails(grpc.StatusCode.NOT_FOUND, mesh.registry.GetAgent(
        reg.GetAgentRequest(name=f"agents/{mesh.prefix}-none"), metadata=mesh.me))
    assert await scrapes.value("registry", "corral_rpc_server_duration_seconds_count",
                         method="corral.registry.v1.RegistryService/GetAgent", code="NOT_FOUND") == 1


async def test_every_metric_the_dashboards_query_is_on_a_services_page(world) -> None:
    _mesh, scrapes = world
    wanted = {name for d in dashboards() for q in d.queries() for name in q.metrics}
    async with asyncio.timeout(20):  # the registry's rollout figures come from its first refresh
        while missing := wanted - await scrapes.families():
            await asyncio.sleep(0.2)
    assert not missing
