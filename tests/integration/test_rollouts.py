"""Rollouts and the analysis behind them, with real registry, telemetry and sessions servers on
real PostgreSQL: promotion through every step, inconclusive pauses, a registry restarted or
replicated mid-rollout, rollbacks racing the controller, manual changes, bad input, and the
analysis deciding from synthetic executor spans and recorded scores."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from google.protobuf import duration_pb2, json_format, timestamp_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import registry_pb2_grpc, rollouts_pb2_grpc
from corral.registry.v1 import rollouts_pb2 as ro
from corral.sessions.v1 import sessions_pb2 as ses
from corral.sessions.v1 import sessions_pb2_grpc
from corral.telemetry.v1 import telemetry_pb2 as tel
from corral.telemetry.v1 import telemetry_pb2_grpc
from services.common.server import ServiceHost
from services.common.settings import Settings
from services.registry.controller import RolloutController
from tests import harness
from tests.bundles import packed_agent, publish_requests
from tests.conftest import StartServices
from tests.otlp import attributes, export_request, kv
from tests.rpc import error_details, fails, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TENANT, USER = "acme", "alice"
ALICE = who(TENANT, USER)
ACTIVE = ("PROGRESSING", "PAUSED", "RUNNING", "COMPLETE")
State = ro.RolloutState


# -- steps and specs ---------------------------------------------------------------------------


def weight(w: float) -> ro.RolloutStep:
    return ro.RolloutStep(set_weight=w)


def gate(max_s: int) -> ro.RolloutStep:
    return ro.RolloutStep(analysis=ro.AnalysisGate(max_duration=duration_pb2.Duration(seconds=max_s)))


def pause(s: int) -> ro.RolloutStep:
    return ro.RolloutStep(pause=duration_pb2.Duration(seconds=s))


def manual() -> ro.RolloutStep:
    return ro.RolloutStep(manual=ro.ManualGate())


def analysis(min_sessions: int = 20, *metrics: tel.MetricSpec) -> ro.AnalysisConfig:
    return ro.AnalysisConfig(
        metrics=list(metrics), interval=duration_pb2.Duration(seconds=1), min_sessions=min_sessions
    )


def state(r: ro.Rollout) -> str:
    return State.Name(r.state).removeprefix("ROLLOUT_STATE_")


# -- synthetic executor spans ------------------------------------------------------------------


def invocation_span(
    agent: str, version: int, endpoint: str, session: str, *, error: bool, latency_ms: float = 120.0
) -> Span:
    """Shaped like the executor's `invoke_agent` span for one turn of `session`."""
    attrs = {
        "gen_ai.operation.name": "invoke_agent",
        "corral.agent": f"agents/{agent}",
        "corral.version": f"agents/{agent}/versions/{version}",
        "corral.endpoint": f"agents/{agent}/endpoints/{endpoint}",
        "corral.session": f"sessions/{session}",
        "corral.tenant": TENANT,
        "corral.invocation": uuid.uuid4().hex,
    }
    start = time.time_ns()
    return Span(
        trace_id=os.urandom(16),
        span_id=os.urandom(8),
        name=f"invoke_agent {agent}",
        kind=Span.SpanKind.SPAN_KIND_SERVER,
        start_time_unix_nano=start,
        end_time_unix_nano=start + int(latency_ms * 1e6),
        status=Status(code=Status.STATUS_CODE_ERROR if error else Status.STATUS_CODE_OK,
                      message="candidate regression" if error else ""),
        attributes=attributes(attrs),
    )


# -- the world a test runs in ------------------------------------------------------------------


@dataclass
class World:
    settings: Settings
    tmp: Path
    agent: str
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    versions: dict[int, reg.Version] = field(default_factory=dict)
    endpoint_id: str = "prod"

    def __post_init__(self) -> None:
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.channel("registry"))
        self.rollouts = rollouts_pb2_grpc.RolloutServiceStub(self.channel("registry"))
        self.telemetry = telemetry_pb2_grpc.TelemetryServiceStub(self.channel("telemetry"))
        self.otlp = trace_service_pb2_grpc.TraceServiceStub(self.channel("telemetry"))
        self.sessions = sessions_pb2_grpc.SessionsServiceStub(self.channel("sessions"))

    def channel(self, service: str, addr: str = "") -> grpc.aio.Channel:
        ch = grpc.aio.insecure_channel(addr or self.settings.addrs[service])
        self.channels.append(ch)
        return ch

    @property
    def endpoint(self) -> str:
        return f"agents/{self.agent}/endpoints/{self.endpoint_id}"

    def version(self, n: int) -> str:
        return f"agents/{self.agent}/versions/{n}"

    async def publish(self, count: int) -> list[int]:
        """`count` distinct versions of this test's agent."""
        for i in range(count):
            data = packed_agent(self.tmp, self.agent, prompt=f"You help (variant {i}).\n")
            v = await self.registry.PublishVersion(iter(publish_requests(data)), metadata=ALICE)
            self.versions[v.number] = v
        return sorted(self.versions)

    async def set_endpoint(self, version: int, *, create: bool = False) -> reg.Endpoint:
        body = reg.Endpoint(name=self.endpoint, traffic=[reg.TrafficTarget(version=self.version(version), percent=100)])
        return await self.registry.UpdateEndpoint(
            reg.UpdateEndpointRequest(endpoint=body, allow_missing=create), metadata=ALICE)

    async def get_endpoint(self) -> reg.Endpoint:
        return await self.registry.GetEndpoint(reg.GetEndpointRequest(name=self.endpoint))

    async def traffic(self) -> list[tuple[str, float]]:
        return [(t.version, t.percent) for t in (await self.get_endpoint()).traffic]

    async def start_rollout(
        self, candidate: int, steps: Sequence[ro.RolloutStep], config: ro.AnalysisConfig | None = None,
        policy: int = ro.SESSION_POLICY_DRAIN,
    ) -> ro.Rollout:
        rollout = ro.Rollout(candidate_version=self.version(candidate), steps=list(steps),
                             analysis=config or analysis(), rollback_policy=policy)
        return await self.rollouts.CreateRollout(
            ro.CreateRolloutRequest(parent=self.endpoint, rollout=rollout), metadata=ALICE)

    async def rollout(self, name: str) -> ro.Rollout:
        return await self.rollouts.GetRollout(ro.GetRolloutRequest(name=name))

    async def wait(
        self, name: str, done: Callable[[ro.Rollout], bool], timeout: float = 20.0, what: str = ""
    ) -> ro.Rollout:
        deadline = time.monotonic() + timeout
        while True:
            r = await self.rollout(name)
            if done(r):
                return r
            if time.monotonic() > deadline:
                pytest.fail(f"{name} never became {what or 'what the test waited for'}: {state(r)} "
                            f"step {r.current_step} weight {r.current_weight} ({r.state_reason})")
            await asyncio.sleep(0.1)

    async def audit(self, resource: str) -> list[reg.AuditEvent]:
        """Every audit event about `resource` or beneath it, oldest first."""
        events: list[reg.AuditEvent] = []
        token = ""
        while True:
            page = await self.registry.ListAuditEvents(reg.ListAuditEventsRequest(
                resource_prefix=resource, page_size=500, page_token=token))
            events += page.events
            token = page.next_page_token
            if not token:
                return list(reversed(events))

    async def rollout_events(self, name: str) -> list[tuple[str, int]]:
        """(method, step) of each audit event about the rollout, oldest first."""
        out = []
        for e in await self.audit(name):
            if e.resource != name:
                continue
            details = json_format.MessageToDict(e.details)
            out.append((e.method, int(details.get("step", -1))))
        return out

    async def send_sessions(self, version: int, sessions: int, fail_every: int = 0, prefix: str = "") -> list[str]:
        """Invocation spans for `sessions` sessions of `version` (1-3 turns each); with fail_every
        = k, every k-th session has a failed turn."""
        ids, spans = [], []
        for i in range(sessions):
            sid = f"{prefix or self.agent}-v{version}-{uuid.uuid4().hex[:8]}"
            ids.append(sid)
            failed = fail_every > 0 and i % fail_every == fail_every - 1
            for turn in range(1 + i % 3):
                spans.append(invocation_span(self.agent, version, self.endpoint_id, sid,
                                             error=failed and turn == 0, latency_ms=100 + (i * 7 + turn * 13) % 50))
        executor = [kv("service.name", "corral-executor")]
        response = await self.otlp.Export(export_request(spans, executor), metadata=ALICE)
        assert not response.partial_success.rejected_spans, response.partial_success.error_message
        return ids


@pytest_asyncio.fixture
async def make_world(services: harness.Platform, tmp_path: Path) -> AsyncIterator[Callable[..., World]]:
    worlds: list[World] = []

    def make(agent_prefix: str = "ro") -> World:
        w = World(services.settings, tmp_path, f"{agent_prefix}-{uuid.uuid4().hex[:8]}")
        worlds.append(w)
        return w

    yield make
    # The database is shared by the run, and every registry's controller drives every running
    # rollout: leave none of this test's running, whatever the outcome.
    conn = await asyncpg.connect(services.settings.require_database())
    try:
        for w in worlds:
            await conn.execute(
                "UPDATE registry.rollouts SET state = 'ABORTED', state_reason = 'test teardown', end_time = now() "
                "WHERE agent = $1 AND state = ANY($2::text[])", w.agent, list(ACTIVE))
    except asyncpg.UndefinedTableError:
        pass  # no registry ran in this database yet
    finally:
        await conn.close()
    for w in worlds:
        for ch in w.channels:
            await ch.close()


async def ready(make_world: Callable[..., World], versions: int = 2) -> World:
    """An agent with `versions` versions and a `prod` endpoint serving version 1."""
    w = make_world()
    await w.publish(versions)
    await w.set_endpoint(1, create=True)
    return w


# -- 1. promotion ------------------------------------------------------------------------------


async def test_equal_candidate_is_promoted_through_every_step(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world)
    before = (await w.get_endpoint()).revision
    steps = [weight(20), gate(30), weight(60), gate(30), weight(100)]
    r = await w.start_rollout(2, steps, analysis(20))
    assert state(r) == "PROGRESSING" and r.stable_version == w.version(1)

    await w.wait(r.name, lambda x: x.current_weight == 20, what="at 20%")
    assert sorted(await w.traffic()) == [(w.version(1), 80.0), (w.version(2), 20.0)]
    # Both versions serve the same way: no failures, the same latencies (default metrics).
    await w.send_sessions(1, 200)
    await w.send_sessions(2, 200)

    done = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="finished")
    assert state(done) == "SUCCEEDED", done.state_reason
    assert done.current_weight == 100 and done.current_step == len(steps)
    assert done.last_analysis.verdict == tel.VERDICT_PASS
    assert {c.metric.name for c in done.last_analysis.comparisons} >= {"session_error_rate"}
    assert all(c.candidate.sessions == 200 and c.baseline.sessions == 200 for c in done.last_analysis.comparisons)
    assert await w.traffic() == [(w.version(2), 100.0)]

    events = await w.rollout_events(r.name)
    assert events == [
        ("CreateRollout", -1),
        ("Rollout:WEIGHT_SET", 0), ("Rollout:ANALYSIS_PASSED", 1),
        ("Rollout:WEIGHT_SET", 2), ("Rollout:ANALYSIS_PASSED", 3),
        ("Rollout:SUCCEEDED", 4),
    ], events
    # One endpoint revision per weight step (20, 60, 100), no more.
    assert (await w.get_endpoint()).revision == before + 3


# -- 2. inconclusive ---------------------------------------------------------------------------


async def test_no_traffic_pauses_as_inconclusive_and_never_promotes(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world)
    r = await w.start_rollout(2, [weight(10), gate(2), weight(100)], analysis(20))
    t0 = time.monotonic()
    paused = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="paused")
    assert state(paused) == "PAUSED", paused.state_reason
    assert "inconclusive" in paused.state_reason, paused.state_reason
    assert time.monotonic() - t0 >= 1.5  # not before the gate's maximum duration
    assert paused.current_step == 1 and paused.current_weight == 10
    assert paused.last_analysis.verdict == tel.VERDICT_INCONCLUSIVE

    await asyncio.sleep(1.5)  # several controller ticks: still paused, still at 10%
    still = await w.rollout(r.name)
    assert state(still) == "PAUSED" and still.current_weight == 10
    assert sorted(await w.traffic()) == [(w.version(1), 90.0), (w.version(2), 10.0)]
    events = await w.rollout_events(r.name)
    assert [m for m, _ in events].count("Rollout:PAUSED") == 1
    assert "Rollout:ANALYSIS_PASSED" not in [m for m, _ in events]

    resumed = await w.rollouts.ResumeRollout(ro.ResumeRolloutRequest(name=r.name), metadata=ALICE)
    assert state(resumed) == "PROGRESSING" and resumed.current_step == 2
    done = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="finished")
    assert state(done) == "SUCCEEDED" and await w.traffic() == [(w.version(2), 100.0)]
    assert [m for m, _ in await w.rollout_events(r.name)][-2:] == ["ResumeRollout", "Rollout:SUCCEEDED"]


# -- 3. a registry restarted mid-rollout -------------------------------------------------------


async def test_registry_restarted_mid_rollout_resumes_without_repeating_a_step(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry")
    first = (await start_services("registry"))["registry"]
    second: ServiceHost | None = None
    try:
        w = await ready(make_world)
        before = (await w.get_endpoint()).revision
        steps = [weight(10), pause(2), weight(50), pause(2), weight(100)]
        r = await w.start_rollout(2, steps)
        await w.wait(r.name, lambda x: x.current_step == 1, what="in its first pause")
        await first.stop(grace=0.2)
        await asyncio.sleep(2.5)  # the pause runs out while no registry is up
        second = await harness.restart(first)
        done = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="finished")
        assert state(done) == "SUCCEEDED", done.state_reason
        assert await w.traffic() == [(w.version(2), 100.0)]
        events = await w.rollout_events(r.name)
        assert events == [("CreateRollout", -1), ("Rollout:WEIGHT_SET", 0), ("Rollout:WEIGHT_SET", 2),
                          ("Rollout:SUCCEEDED", 4)], events
        assert (await w.get_endpoint()).revision == before + 3  # 10%, 50%, 100%: once each
    finally:
        await first.stop(grace=0.2)
        if second is not None:
            await second.stop(grace=0.2)


# -- 4. two replicas ---------------------------------------------------------------------------


async def test_two_registry_replicas_apply_each_step_once(
    start_services: StartServices, services: harness.Platform, make_world: Callable[..., World],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world)
    replica = await harness.start_service("registry", services.settings)
    drivers: set[int] = set()
    advance = RolloutController.advance

    async def spy(self: RolloutController, seen: Any) -> Any:
        if seen.agent == w.agent:
            drivers.add(id(self))
        return await advance(self, seen)

    monkeypatch.setattr(RolloutController, "advance", spy)
    try:
        before = (await w.get_endpoint()).revision
        steps = [weight(10), pause(1), weight(30), pause(1), weight(60), pause(1), weight(100)]
        r = await w.start_rollout(2, steps)
        # Both replicas serve the rollout API over the same database.
        via_replica = rollouts_pb2_grpc.RolloutServiceStub(w.channel("registry", replica.address))
        seen = await via_replica.GetRollout(ro.GetRolloutRequest(name=r.name))
        assert seen.name == r.name
        done = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="finished")
        assert state(done) == "SUCCEEDED", done.state_reason
        events = await w.rollout_events(r.name)
        assert events == [("CreateRollout", -1), ("Rollout:WEIGHT_SET", 0), ("Rollout:WEIGHT_SET", 2),
                          ("Rollout:WEIGHT_SET", 4), ("Rollout:SUCCEEDED", 6)], events
        assert (await w.get_endpoint()).revision == before + 4
        assert await w.traffic() == [(w.version(2), 100.0)]
        assert len(drivers) == 2, "both replicas' controllers should have contended for the rollout"
    finally:
        await replica.stop(grace=0.2)


# -- 5. a manual rollback racing the controller ------------------------------------------------


async def test_manual_rollback_racing_the_controller_leaves_one_consistent_endpoint(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world)
    # Nine weight steps in a row: the controller applies them back to back while we roll back.
    steps = [weight(p) for p in range(10, 100, 10)] + [manual(), weight(100)]
    first = (await w.get_endpoint()).revision
    revisions = 0
    for round_ in range(6):
        before = (await w.get_endpoint()).revision
        r = await w.start_rollout(2, steps)
        await asyncio.sleep(0.012 * round_)  # catch the controller at different steps
        request = ro.RollbackEndpointRequest(name=w.endpoint)
        results = await asyncio.gather(
            *(w.rollouts.RollbackEndpoint(request, metadata=ALICE) for _ in range(3)), return_exceptions=True)
        ok = [x for x in results if isinstance(x, reg.Endpoint)]
        errors = [x for x in results if not isinstance(x, reg.Endpoint)]
        # One rollback ends the rollout; the others find nothing earlier to go back to.
        assert len(ok) == 1, results
        for err in errors:
            assert isinstance(err, grpc.aio.AioRpcError), err
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, f"{err.code()}: {err.details()}"
            assert "no earlier stable version" in (err.details() or "")
        assert [(t.version, t.percent) for t in ok[0].traffic] == [(w.version(1), 100.0)]

        await asyncio.sleep(0.3)  # the controller's next steps would follow at once
        ended = await w.rollout(r.name)
        assert state(ended) == "ROLLED_BACK" and ended.current_weight == 0, ended.state_reason
        assert f"rolled back by {USER}" in ended.state_reason
        endpoint = await w.get_endpoint()
        assert [(t.version, t.percent) for t in endpoint.traffic] == [(w.version(1), 100.0)]
        # Every revision is accounted for: one per weight step the controller applied, then the
        # rollback's, which is the last.
        methods = [m for m, _ in await w.rollout_events(r.name)]
        assert "Rollout:SUCCEEDED" not in methods and "Rollout:ROLLED_BACK" not in methods, methods
        applied = methods.count("Rollout:WEIGHT_SET")
        assert endpoint.revision == before + applied + 1 == ok[0].revision, (before, applied, endpoint.revision)
        revisions += applied + 1
    await asyncio.sleep(1.2)  # a full controller tick later, nothing moved
    endpoint = await w.get_endpoint()
    assert endpoint.revision == first + revisions
    assert [(t.version, t.percent) for t in endpoint.traffic] == [(w.version(1), 100.0)]
    listed = await w.rollouts.ListRollouts(ro.ListRolloutsRequest(parent=w.endpoint))
    assert [state(x) for x in listed.rollouts] == ["ROLLED_BACK"] * 6
    rollbacks = [e for e in await w.audit(w.endpoint) if e.method == "RollbackEndpoint"]
    assert len(rollbacks) == 6


async def test_an_experiment_an_older_release_ended_by_rollback_reads_as_aborted(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    """Before experiments had states of their own, an endpoint rollback wrote ROLLED_BACK into
    the experiment it ended; such rows must still list and read (as ABORTED, which they were)."""
    await start_services("telemetry", "sessions", "registry")
    w = await ready(make_world)
    experiment = ro.Experiment(variants=[reg.TrafficTarget(version=w.version(1), percent=50),
                                         reg.TrafficTarget(version=w.version(2), percent=50)])
    made = await w.rollouts.CreateExperiment(
        ro.CreateExperimentRequest(parent=w.endpoint, experiment=experiment), metadata=ALICE)
    conn = await asyncpg.connect(w.settings.require_database())
    try:
        await conn.execute(
            "UPDATE registry.rollouts SET state = 'ROLLED_BACK', end_time = now() "
            "WHERE agent = $1 AND kind = 'experiment'", w.agent)
    finally:
        await conn.close()
    got = await w.rollouts.GetExperiment(ro.GetExperimentRequest(name=made.name), metadata=ALICE)
    assert got.state == ro.EXPERIMENT_STATE_ABORTED
    listed = await w.rollouts.ListExperiments(
        ro.ListExperimentsRequest(parent=w.endpoint), metadata=ALICE)
    assert [e.name for e in listed.experiments] == [made.name]


# -- 6. a manual endpoint change aborts -------------------------------------------------------


async def test_manual_endpoint_update_aborts_the_rollout(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world, versions=3)
    r = await w.start_rollout(2, [weight(10), gate(60), weight(100)])
    await w.wait(r.name, lambda x: x.current_step == 1, what="at its analysis gate")
    endpoint = await w.set_endpoint(3)
    assert [(t.version, t.percent) for t in endpoint.traffic] == [(w.version(3), 100.0)]

    aborted = await w.rollout(r.name)
    assert state(aborted) == "ABORTED"
    assert "endpoint set manually" in aborted.state_reason and USER in aborted.state_reason, aborted.state_reason
    audited = [e for e in await w.audit(r.name) if e.method == "AbortRollout"]
    assert len(audited) == 1 and audited[0].user == USER
    assert "manually" in json_format.MessageToDict(audited[0].details)["reason"]
    await asyncio.sleep(1.2)  # the controller leaves the manual setting alone
    assert await w.traffic() == [(w.version(3), 100.0)]
    assert state(await w.rollout(r.name)) == "ABORTED"
    # The endpoint is free for the next rollout.
    nxt = await w.start_rollout(2, [weight(100)])
    assert (await w.wait(nxt.name, lambda x: state(x) != "PROGRESSING")).state == State.ROLLOUT_STATE_SUCCEEDED


# -- 7. bad input ------------------------------------------------------------------------------


async def test_bad_input_is_refused_with_its_reason_and_changes_nothing(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world)
    ok_steps = [weight(50), weight(100)]

    async def snapshot() -> tuple[int, int, int]:
        listed = await w.rollouts.ListRollouts(ro.ListRolloutsRequest(parent=w.endpoint))
        return (await w.get_endpoint()).revision, len(listed.rollouts), len(await w.audit(f"agents/{w.agent}/"))

    before = await snapshot()
    Code = grpc.StatusCode

    err = await fails(Code.FAILED_PRECONDITION, w.start_rollout(1, ok_steps))
    assert "already the stable version" in err.details()
    err = await fails(Code.FAILED_PRECONDITION, w.start_rollout(9, ok_steps))
    assert w.version(9) in err.details() and "does not exist" in err.details()
    err = await fails(Code.INVALID_ARGUMENT, w.start_rollout(2, [weight(50), weight(30), weight(100)]))
    assert "does not increase" in err.details() and "steps[1]" in str(error_details(err)[1])
    err = await fails(Code.INVALID_ARGUMENT, w.start_rollout(2, [weight(50), weight(150)]))
    assert "150" in err.details() and "<= 100" in err.details()
    err = await fails(Code.INVALID_ARGUMENT, w.start_rollout(2, [weight(50), weight(90)]))
    assert "must end at set_weight 100" in err.details()
    err = await fails(Code.INVALID_ARGUMENT, w.start_rollout(
        2, ok_steps, analysis(20, tel.MetricSpec(name="happiness"))))
    assert "'happiness' is not a metric" in err.details()
    assert error_details(err)[1] == ["metrics[0].name"]
    err = await fails(Code.INVALID_ARGUMENT, w.start_rollout(
        2, ok_steps, analysis(20, tel.MetricSpec(name="session_error_rate", tolerance=-0.1))))
    assert "-0.1" in err.details() and "negative" in err.details()
    assert error_details(err)[1] == ["metrics[0].tolerance"]
    experiment = ro.Experiment(variants=[reg.TrafficTarget(version=w.version(1), percent=80),
                                         reg.TrafficTarget(version=w.version(2), percent=30)])
    err = await fails(Code.INVALID_ARGUMENT, w.rollouts.CreateExperiment(
        ro.CreateExperimentRequest(parent=w.endpoint, experiment=experiment), metadata=ALICE))
    assert "add up to 110%" in err.details()
    assert await snapshot() == before, "a refused request changed something"

    # Actions on a finished rollout.
    r = await w.start_rollout(2, [weight(50), manual(), weight(100)])
    r = await w.rollouts.AbortRollout(ro.AbortRolloutRequest(name=r.name, reason="changed my mind"), metadata=ALICE)
    assert state(r) == "ABORTED" and r.state_reason == "changed my mind"
    after_abort = await snapshot()
    for call in (
        w.rollouts.PromoteRollout(ro.PromoteRolloutRequest(name=r.name), metadata=ALICE),
        w.rollouts.PromoteRollout(ro.PromoteRolloutRequest(name=r.name, full=True), metadata=ALICE),
        w.rollouts.PauseRollout(ro.PauseRolloutRequest(name=r.name), metadata=ALICE),
        w.rollouts.ResumeRollout(ro.ResumeRolloutRequest(name=r.name), metadata=ALICE),
        w.rollouts.AbortRollout(ro.AbortRolloutRequest(name=r.name), metadata=ALICE),
    ):
        err = await fails(Code.FAILED_PRECONDITION, call)
        assert r.name in err.details() and "already ended (aborted)" in err.details()
    assert await snapshot() == after_abort
    assert await w.traffic() == [(w.version(1), 100.0)]
    await fails(Code.NOT_FOUND, w.rollouts.GetRollout(ro.GetRolloutRequest(name=f"{w.endpoint}/rollouts/99")))

    err = await fails(Code.NOT_FOUND, w.telemetry.RecordScore(tel.RecordScoreRequest(score=tel.Score(
        session="sessions/never-ran", score_name="quality", value=0.5)), metadata=ALICE))
    assert "sessions/never-ran" in err.details()
    listed = await w.telemetry.ListScores(
        tel.ListScoresRequest(filter=tel.SpanFilter(session="sessions/never-ran")), metadata=ALICE)
    assert list(listed.scores) == []


# -- 8. the analysis decides -------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["MIGRATE", "STOP"])
async def test_failing_candidate_is_rolled_back_by_the_analysis(
    start_services: StartServices, make_world: Callable[..., World], policy: str
) -> None:
    await start_services("telemetry", "registry", "sessions")
    w = await ready(make_world)
    stable, candidate = w.versions[1], w.versions[2]

    async def new_session(v: reg.Version) -> str:
        s = await w.sessions.CreateSession(ses.CreateSessionRequest(session=ses.Session(
            agent=f"agents/{w.agent}", version=v.name, version_digest=v.digest, endpoint=w.endpoint)),
            metadata=ALICE)
        return s.name

    on_candidate = [await new_session(candidate) for _ in range(3)]
    on_stable = await new_session(stable)
    r = await w.start_rollout(2, [weight(50), gate(30), weight(100)], analysis(20),
                              policy=getattr(ro, f"SESSION_POLICY_{policy}"))
    await w.wait(r.name, lambda x: x.current_weight == 50, what="at 50%")
    # The candidate fails one session in three; the stable version almost never.
    await w.send_sessions(2, 90, fail_every=3)
    await w.send_sessions(1, 90, fail_every=90)

    done = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="rolled back")
    assert state(done) == "ROLLED_BACK", done.state_reason
    assert "session_error_rate" in done.state_reason
    failing = {c.metric.name: c for c in done.last_analysis.comparisons if c.verdict == tel.VERDICT_FAIL}
    assert "session_error_rate" in failing, done.last_analysis
    session_errors = failing["session_error_rate"]
    assert session_errors.candidate.estimate == pytest.approx(1 / 3, abs=0.02)
    assert session_errors.baseline.estimate == pytest.approx(1 / 90, abs=0.01)
    assert session_errors.ci_low > 0
    assert await w.traffic() == [(stable.name, 100.0)]
    assert ("Rollout:ROLLED_BACK", 1) in await w.rollout_events(r.name)

    async def session(name: str) -> ses.Session:
        return await w.sessions.GetSession(ses.GetSessionRequest(name=name), metadata=ALICE)

    deadline = time.monotonic() + 10
    while True:  # the policy runs right after the rollback commits
        seen = [await session(n) for n in on_candidate]
        if policy == "MIGRATE":
            settled = all(s.version == stable.name for s in seen)
        else:
            settled = all(s.status == ses.SESSION_STATUS_STOPPED for s in seen)
        if settled or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    if policy == "MIGRATE":
        assert [(s.version, s.version_digest, s.status) for s in seen] == \
            [(stable.name, stable.digest, ses.SESSION_STATUS_ACTIVE)] * 3
    else:
        assert [(s.version, s.status) for s in seen] == [(candidate.name, ses.SESSION_STATUS_STOPPED)] * 3
    untouched = await session(on_stable)
    assert (untouched.version, untouched.status) == (stable.name, ses.SESSION_STATUS_ACTIVE)


# -- 9. scores move the score metric -----------------------------------------------------------


async def test_recorded_scores_move_the_score_metric(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry")
    w = make_world("scored")
    start = timestamp_pb2.Timestamp()
    start.FromNanoseconds(time.time_ns() - 1_000_000_000)
    base_ids = await w.send_sessions(1, 4)
    cand_ids = await w.send_sessions(2, 4)

    async def compare() -> tel.MetricComparison:
        end = timestamp_pb2.Timestamp()
        end.FromNanoseconds(time.time_ns() + 1_000_000_000)
        response = await w.telemetry.CompareVersions(tel.CompareVersionsRequest(
            agent=f"agents/{w.agent}", baseline_version=w.version(1), candidate_version=w.version(2),
            start_time=start, end_time=end, metrics=[tel.MetricSpec(name="score:quality")], min_sessions=2,
            endpoint=w.endpoint), metadata=ALICE)
        assert [c.metric.name for c in response.comparisons] == ["score:quality"]
        return response.comparisons[0]

    nothing = await compare()
    assert nothing.verdict == tel.VERDICT_INCONCLUSIVE and "no score:quality values" in nothing.explanation
    assert (nothing.baseline.sessions, nothing.candidate.sessions) == (4, 4)

    async def score(sid: str, value: float) -> tel.Score:
        return await w.telemetry.RecordScore(tel.RecordScoreRequest(score=tel.Score(
            session=f"sessions/{sid}", score_name="quality", value=value, source=tel.SCORE_SOURCE_HUMAN)),
            metadata=ALICE)

    # The baseline: one session scored twice (its mean, 0.6, counts once) and three more.
    recorded = {w.version(1): [(base_ids[0], 0.5), (base_ids[0], 0.7), (base_ids[1], 0.8),
                               (base_ids[2], 1.0), (base_ids[3], 0.9)],
                w.version(2): [(cand_ids[0], 0.2), (cand_ids[1], 0.4), (cand_ids[2], 0.3)]}
    for version, values in recorded.items():
        for sid, value in values:
            s = await score(sid, value)
            assert s.version == version and s.value == value
    moved = await compare()
    assert moved.baseline.estimate == pytest.approx((0.6 + 0.8 + 1.0 + 0.9) / 4)
    assert moved.candidate.estimate == pytest.approx((0.2 + 0.4 + 0.3) / 3)
    assert moved.difference == pytest.approx(moved.candidate.estimate - moved.baseline.estimate)
    assert moved.ci_low <= moved.difference <= moved.ci_high

    await score(cand_ids[3], 1.0)  # one more score moves the candidate's mean again
    again = await compare()
    assert again.candidate.estimate == pytest.approx((0.2 + 0.4 + 0.3 + 1.0) / 4)
    assert again.baseline.estimate == pytest.approx(moved.baseline.estimate)
    per_version = Counter(s.version for s in (await w.telemetry.ListScores(tel.ListScoresRequest(
        score_name="quality", filter=tel.SpanFilter(version=w.version(2))), metadata=ALICE)).scores)
    assert per_version == {w.version(2): 4}
