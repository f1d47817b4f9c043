"""Webhooks under the outbound policy: CreateRollout and CreateExperiment refuse a webhook the
platform must not call (INVALID_ARGUMENT naming the field, nothing stored), a delivery goes only
where the policy allows at the time it is made, and a redirect is never followed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from aiohttp import web

from corral.names import AgentRef
from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import rollouts_pb2 as ro
from services.common.identity import Caller
from services.common.outbound import LOOPBACK, OutboundPolicy
from services.registry import rollout_model
from services.registry.model import EndpointChange
from services.registry.webhooks import WebhookNotifier
from tests.bundles import packed_agent
from tests.conftest import StartServices
from tests.fakes.common import FakeResolver
from tests.fakes.registry import REGISTRY_TENANT, registry_world
from tests.rollout_world import ALICE, World, analysis, manual, ready, weight
from tests.rpc import error_details, fails

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

METADATA_SPELLINGS = [
    "http://169.254.169.254/latest/meta-data",
    "http://2852039166/",
    "http://0xA9FEA9FE/",
    "http://0251.0376.0251.0376/",
    "http://169.254.169.254./",
    "http://[::ffff:169.254.169.254]/",
    "http://good@169.254.169.254/",
    "http://[fe80::1]/",
]


@dataclass
class Receiver:
    """A loopback webhook receiver recording what reaches it; it may answer with a redirect."""

    hits: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    port: int = 0
    redirect_to: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append((await request.json())["event"])
        self.hosts.append(request.headers.get("Host", ""))
        if self.redirect_to:
            raise web.HTTPTemporaryRedirect(self.redirect_to)
        return web.json_response({})


@pytest_asyncio.fixture
async def receivers() -> AsyncIterator[tuple[Receiver, Receiver]]:
    """(a receiver, another that redirects every POST to the first)."""
    target, redirector = Receiver(), Receiver()
    runners = []
    for receiver in (target, redirector):
        app = web.Application()
        app.add_routes([web.post("/{tail:.*}", receiver.handle)])
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        receiver.port = runner.addresses[0][1]
        runners.append(runner)
    redirector.redirect_to = f"http://127.0.0.1:{target.port}/stolen"
    try:
        yield target, redirector
    finally:
        for runner in runners:
            await runner.cleanup()


def _rollout(w: World, webhook: str) -> ro.CreateRolloutRequest:
    """A rollout that waits at a manual gate after its first step."""
    return ro.CreateRolloutRequest(parent=w.endpoint, rollout=ro.Rollout(
        candidate_version=w.version(2), steps=[weight(50), manual(), weight(100)],
        analysis=analysis(), webhook_url=webhook))


async def test_a_webhook_to_the_metadata_address_is_refused_at_create(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world)
    for url in METADATA_SPELLINGS:
        err = await fails(grpc.StatusCode.INVALID_ARGUMENT,
                          w.rollouts.CreateRollout(_rollout(w, url), metadata=ALICE))
        assert error_details(err)[1] == ["rollout.webhook_url"], (url, err.details())
        assert (err.details() or "").startswith("rollout.webhook_url: ")
    experiment = ro.Experiment(
        variants=[reg.TrafficTarget(version=w.version(1), percent=50),
                  reg.TrafficTarget(version=w.version(2), percent=50)],
        webhook_url="http://0.0.0.0:9/")
    err = await fails(grpc.StatusCode.INVALID_ARGUMENT, w.rollouts.CreateExperiment(
        ro.CreateExperimentRequest(parent=w.endpoint, experiment=experiment), metadata=ALICE))
    assert error_details(err)[1] == ["experiment.webhook_url"] and "unspecified" in (err.details() or "")
    listed = await w.rollouts.ListRollouts(ro.ListRolloutsRequest(parent=w.endpoint), metadata=ALICE)
    assert list(listed.rollouts) == [] and await w.traffic() == [(w.version(1), 100.0)]


async def test_a_webhook_redirect_is_not_followed(
    start_services: StartServices, make_world: Callable[..., World],
    receivers: tuple[Receiver, Receiver],
) -> None:
    """The test platform allows loopback, so the redirect's target is one the policy would allow:
    it is still never called, because no redirect is followed."""
    await start_services("telemetry", "registry")
    target, redirector = receivers
    w = await ready(make_world)
    made = await w.rollouts.CreateRollout(
        _rollout(w, f"http://127.0.0.1:{redirector.port}/hook"), metadata=ALICE)
    await w.wait(made.name, lambda r: r.current_step == 1, what="at its manual gate")
    await w.rollouts.AbortRollout(ro.AbortRolloutRequest(name=made.name), metadata=ALICE)
    for _ in range(100):
        if "ABORTED" in redirector.hits:
            break
        await asyncio.sleep(0.05)
    # Each transition POSTed once: a 3xx is a failed delivery, neither followed nor retried.
    assert sorted(redirector.hits) == sorted(set(redirector.hits))
    assert {"STARTED", "ABORTED"} <= set(redirector.hits)
    await asyncio.sleep(0.3)
    assert target.hits == []


async def test_each_delivery_checks_where_the_name_resolves_now(
    tmp_path: Path, receivers: tuple[Receiver, Receiver]
) -> None:
    """hook.test did not resolve when the rollout was created; at delivery it resolves to
    loopback, which this registry does not allow: nothing reaches the receiver. Allowed, the same
    delivery dials the address it checked, with the webhook's own name as its Host."""
    target, _ = receivers
    world = registry_world()
    agent = AgentRef("hooked")
    caller = Caller(REGISTRY_TENANT, "alice")
    for i in range(2):
        data = packed_agent(tmp_path, agent.agent, "app = None\n", prompt=f"v{i}\n")
        await world.registry.publish(caller, None, data, "", "")
    prod = agent.endpoint("prod")
    await world.registry.set_endpoint(caller, prod, EndpointChange(
        (rollout_model.TrafficTarget(agent.version(1), 100),), None), allow_missing=True)
    url = f"http://hook.test:{target.port}/hook"
    await world.rollouts.create(caller, prod, rollout_model.RolloutRequest(
        agent.version(2), steps=(rollout_model.SetWeight(100),), webhook_url=url))
    [started] = world.announced.transitions
    names = FakeResolver({"hook.test": ["127.0.0.1"]})

    strict = WebhookNotifier(OutboundPolicy((), resolver=names), wait_max_s=0.01)
    strict(started)
    await strict.close()
    assert strict.delivered == 0 and target.hits == []

    allowed = WebhookNotifier(OutboundPolicy(LOOPBACK, resolver=names), wait_max_s=0.01)
    allowed(started)
    await allowed.close()
    assert allowed.delivered == 1
    assert target.hits == ["STARTED"] and target.hosts == [f"hook.test:{target.port}"]
