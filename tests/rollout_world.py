"""What the rollout tests share: rollout steps and analysis specs, synthetic executor
invocation spans, and the World a test runs in (an agent of its own, stubs to the registry,
telemetry and sessions, and waiting on a rollout)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import registry_pb2_grpc, rollouts_pb2_grpc
from corral.registry.v1 import rollouts_pb2 as ro
from corral.sessions.v1 import sessions_pb2_grpc
from corral.telemetry.v1 import telemetry_pb2 as tel
from corral.telemetry.v1 import telemetry_pb2_grpc
from services.common.settings import Settings
from tests.bundles import packed_agent, publish_requests
from tests.credentials import internal_channel
from tests.otlp import attributes, export_request, kv
from tests.rpc import channel_as, who

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
        # What the platform does: executors export spans, the registry asks for analyses.
        self.otlp = trace_service_pb2_grpc.TraceServiceStub(self.internal("telemetry", "executor"))
        self.analysis = telemetry_pb2_grpc.TelemetryServiceStub(self.internal("telemetry", "registry"))
        self.sessions = sessions_pb2_grpc.SessionsServiceStub(self.channel("sessions"))

    def channel(self, service: str, addr: str = "") -> grpc.aio.Channel:
        ch = channel_as(addr or self.settings.addrs[service], ALICE)
        self.channels.append(ch)
        return ch

    def internal(self, service: str, as_service: str) -> grpc.aio.Channel:
        ch = internal_channel(self.settings, service, as_service)
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
        response = await self.otlp.Export(export_request(spans, executor))
        assert not response.partial_success.rejected_spans, response.partial_success.error_message
        return ids


async def ready(make_world: Callable[..., World], versions: int = 2) -> World:
    """An agent with `versions` versions and a `prod` endpoint serving version 1."""
    w = make_world()
    await w.publish(versions)
    await w.set_endpoint(1, create=True)
    return w
