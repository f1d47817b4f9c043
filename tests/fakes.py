"""Fakes for unit tests, in one place: each stands in for one Protocol seam of a service (its
store, clock, id source, or a clients module) so a domain can be tested without a socket."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from corral.manifest import Manifest
from corral.names import (
    AgentRef,
    EndpointRef,
    ExperimentRef,
    RolloutRef,
    SessionRef,
    ToolRef,
    VersionRef,
)
from services.common.endpoints import EndpointTraffic, EndpointUpdate, TrafficShare
from services.common.errors import Aborted, NotFound, PermissionDenied, Unavailable
from services.common.identity import Caller
from services.common.paging import Key
from services.executor.bundles import BundleCache, UnpackedBundle
from services.executor.drivers.base import Limit, SandboxSpec, Usage
from services.executor.metrics import ExecutorMetrics
from services.executor.model import (
    FinishedTurn,
    Lease,
    ModelHandler,
    PackedBundle,
    SessionState,
    ToolHandler,
    TurnInput,
    TurnOutput,
)
from services.executor.sandbox import Sandbox
from services.executor.starter import SandboxStarter
from services.registry import model as reg
from services.registry import rollout_model as ro
from services.registry.controller import RolloutController
from services.registry.experiments import Experiments
from services.registry.registry import Registry
from services.registry.rollouts import Rollouts
from services.registry.tool_model import ToolRecord, ToolSpec
from services.router import model as router_model
from services.sessions.model import (
    PinnedVersion,
    SessionFilter,
    SessionRecord,
    SessionStatus,
    Turn,
)
from services.telemetry.analysis import SessionObservation
from services.telemetry.model import (
    INPUT_TOKENS_ATTR,
    MODEL_ATTR,
    OUTPUT_TOKENS_ATTR,
    TOOL_ATTR,
    FleetVersion,
    Latency,
    NewScore,
    ObservationQuery,
    Score,
    ScoreFilter,
    SpanFilter,
    SpanRow,
    SpanStatus,
    TraceSummary,
    UsageCounts,
    VersionMetrics,
)

# -- sessions ----------------------------------------------------------------------------------

T0 = datetime(2030, 1, 1, tzinfo=UTC)


class FakeClock:
    """A clock that moves only when a test advances it."""

    def __init__(self, start: datetime = T0) -> None:
        self.time = start

    def now(self) -> datetime:
        return self.time

    def advance(self, seconds: float) -> None:
        self.time += timedelta(seconds=seconds)


class SequentialIds:
    """id0001, id0002, ...: ids a test can predict."""

    def __init__(self) -> None:
        self.n = 0

    def new_id(self) -> str:
        self.n += 1
        return f"id{self.n:04d}"


class MemoryStore:
    """The sessions SessionStore in dicts: records, their states and their turns' events."""

    def __init__(self) -> None:
        self.records: dict[str, SessionRecord] = {}
        self.states: dict[str, bytes] = {}
        self.events: dict[str, list[tuple[int, Turn]]] = {}

    async def insert(self, record: SessionRecord) -> SessionRecord | None:
        if record.id in self.records:
            return None
        self.records[record.id], self.states[record.id] = record, b""
        self.events[record.id] = []
        return record

    async def get(self, session_id: str) -> SessionRecord | None:
        return self.records.get(session_id)

    async def get_state(self, session_id: str) -> tuple[SessionRecord, bytes] | None:
        if session_id not in self.records:
            return None
        return self.records[session_id], self.states[session_id]

    async def list(
        self, tenant: str, where: SessionFilter, after: Key | None, limit: int
    ) -> list[SessionRecord]:
        def kept(r: SessionRecord) -> bool:
            return (
                r.tenant == tenant
                and (where.agent is None or r.agent == where.agent.name)
                and (where.version is None or r.version == where.version.name)
                and (where.status is None or r.status is where.status)
            )

        def key(r: SessionRecord) -> tuple[datetime, str]:
            return r.create_time, r.id

        rows = sorted(filter(kept, self.records.values()), key=key)
        return [r for r in rows if after is None or key(r) > after][:limit]

    async def set_status(
        self, session_id: str, status: SessionStatus, now: datetime, only_from: SessionStatus
    ) -> SessionRecord | None:
        record = self.records.get(session_id)
        if record is None or record.status is not only_from:
            return None
        return self._put(dataclasses.replace(record, status=status, update_time=now))

    async def retire_version(
        self, version: VersionRef, endpoint: EndpointRef | None, now: datetime,
        to: PinnedVersion | None,
    ) -> int:
        due = [
            r
            for r in self.records.values()
            if r.version == version.name
            and (endpoint is None or r.endpoint == endpoint.name)
            and r.status is SessionStatus.ACTIVE
        ]
        for r in due:
            if to is None:
                change = dataclasses.replace(r, status=SessionStatus.STOPPED, update_time=now)
            else:
                change = dataclasses.replace(
                    r, version=to.version.name, version_digest=to.digest, update_time=now
                )
            self._put(change)
        return len(due)

    async def expire_due(self, tenant: str, now: datetime) -> int:
        due = [r for r in self.records.values() if r.tenant == tenant and r.is_expired(now)]
        for r in due:
            self._put(dataclasses.replace(r, status=SessionStatus.EXPIRED, update_time=now))
        return len(due)

    async def touch(self, session_id: str, now: datetime) -> SessionRecord | None:
        record = self.records.get(session_id)
        return (
            None if record is None else self._put(dataclasses.replace(record, last_active_time=now))
        )

    async def touch_and_load(
        self, session_id: str, now: datetime
    ) -> tuple[SessionRecord, bytes] | None:
        record = await self.touch(session_id, now)
        return None if record is None else (record, self.states.get(session_id, b""))

    async def write_state(
        self, session_id: str, state: bytes, expected_etag: str, new_etag: str, now: datetime,
        turn: Turn | None,
    ) -> SessionRecord | None:
        record = self.records.get(session_id)
        if record is None or record.state_etag != expected_etag:
            return None
        record = dataclasses.replace(
            record,
            state_etag=new_etag,
            update_time=now,
            turn_count=record.turn_count + (1 if turn else 0),
            last_active_time=now if turn else record.last_active_time,
        )
        self.states[session_id] = state
        if turn:
            self.events[session_id].append((record.turn_count, turn))
        return self._put(record)

    async def delete(self, session_id: str) -> bool:
        self.states.pop(session_id, None)
        self.events.pop(session_id, None)
        return self.records.pop(session_id, None) is not None

    def _put(self, record: SessionRecord) -> SessionRecord:
        self.records[record.id] = record
        return record


class MemoryLeases:
    """The sessions LeaseStore in a dict; a lease expires by the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.leases: dict[str, tuple[str, str, datetime]] = {}

    def _live(self, session_id: str) -> tuple[str, str, datetime] | None:
        lease = self.leases.get(session_id)
        if lease and lease[2] <= self.clock.now():
            del self.leases[session_id]
            return None
        return lease

    async def acquire(self, session_id: str, lease_id: str, holder: str, ttl_s: float) -> bool:
        if self._live(session_id):
            return False
        self.leases[session_id] = (lease_id, holder, self.clock.now() + timedelta(seconds=ttl_s))
        return True

    async def renew(self, session_id: str, lease_id: str, ttl_s: float) -> str | None:
        lease = self._live(session_id)
        if not lease or lease[0] != lease_id:
            return None
        self.leases[session_id] = (lease_id, lease[1], self.clock.now() + timedelta(seconds=ttl_s))
        return lease[1]

    async def release(self, session_id: str, lease_id: str) -> bool:
        lease = self._live(session_id)
        if not lease or lease[0] != lease_id:
            return False
        del self.leases[session_id]
        return True

    async def holder(self, session_id: str) -> str | None:
        lease = self._live(session_id)
        return lease[0] if lease else None

    async def drop(self, session_id: str) -> None:
        self.leases.pop(session_id, None)


# -- router ------------------------------------------------------------------------------------


class FakeSessions:
    """The router's SessionsClient over a dict of pins, refusing other callers as sessions does."""

    def __init__(self) -> None:
        self.pins: dict[SessionRef, router_model.SessionPin] = {}
        # The version each session was created on, with its timeouts.
        self.created_on: dict[SessionRef, router_model.VersionInfo] = {}
        self.gets = 0

    def _owned(self, caller: Caller, session: SessionRef) -> router_model.SessionPin | None:
        pin = self.pins.get(session)
        if pin is not None and pin.owner != caller:
            raise PermissionDenied(f"{session.name} belongs to another caller")
        return pin

    async def get(self, caller: Caller, session: SessionRef) -> router_model.SessionPin | None:
        self.gets += 1
        return self._owned(caller, session)

    async def create(
        self, caller: Caller, session: SessionRef, version: router_model.VersionInfo,
        endpoint: EndpointRef | None,
    ) -> router_model.SessionPin | None:
        if session in self.pins:
            return None
        pin = router_model.SessionPin(
            session, caller, None, version.ref.parent, version.ref, version.digest, endpoint
        )
        self.pins[session] = pin
        self.created_on[session] = version
        return pin

    async def stop(self, caller: Caller, session: SessionRef) -> None:
        pin = self._owned(caller, session)
        if pin is None:
            raise NotFound(f"{session.name} not found")
        self.pins[session] = dataclasses.replace(pin, ended=router_model.SessionEnd.STOPPED)


class FakeRegistry:
    """The router's RegistryClient over a dict of published versions."""

    def __init__(self, *versions: router_model.VersionInfo) -> None:
        self.versions = {v.ref: v for v in versions}

    async def version(self, ref: VersionRef) -> router_model.VersionInfo:
        if ref not in self.versions:
            raise NotFound(f"{ref.name} does not exist")
        return self.versions[ref]


class FakeExecutor:
    """The router's ExecutorClient: each execution echoes its payload back in `chunks` pieces and
    counts the session's turns. `closed` lists the invocations whose streams were closed."""

    def __init__(self, chunks: int = 2) -> None:
        self.chunks = chunks
        self.invocations: list[router_model.Invocation] = []
        self.closed: list[str] = []
        self.stopped: list[SessionRef] = []
        self.turns: dict[SessionRef, int] = {}

    async def execute(
        self, caller: Caller, invocation: router_model.Invocation, trace: router_model.TraceContext
    ) -> AsyncGenerator[router_model.ExecutionEvent, None]:
        self.invocations.append(invocation)
        session = invocation.resolved.pin.session
        try:
            yield router_model.Started("trace-" + invocation.invocation_id)
            size = max(1, -(-len(invocation.payload) // self.chunks))
            for start in range(0, len(invocation.payload), size):
                yield router_model.Chunk(invocation.payload[start : start + size])
            self.turns[session] = self.turns.get(session, 0) + 1
            yield router_model.Completed(duration_ms=1, turn=self.turns[session])
        finally:
            self.closed.append(invocation.invocation_id)

    async def stop_session(self, caller: Caller, session: SessionRef) -> None:
        self.stopped.append(session)


class FakeEndpoints:
    """The registry's endpoints, as an EndpointMirror reads them: the watch sends one snapshot,
    `get` reads the dict."""

    def __init__(self, *endpoints: EndpointTraffic) -> None:
        self.endpoints = {e.ref: e for e in endpoints}

    async def watch(self) -> AsyncIterator[EndpointUpdate]:
        yield EndpointUpdate(tuple(self.endpoints.values()), snapshot=True)

    async def get(self, ref: EndpointRef) -> EndpointTraffic:
        if ref not in self.endpoints:
            raise NotFound(f"{ref.name} does not exist")
        return self.endpoints[ref]


# -- registry ----------------------------------------------------------------------------------

# The tenant the registry's unit tests call as (a statement first keeps this section's imports
# a block of their own).
REGISTRY_TENANT = "acme"


Row = TypeVar("Row")
Run = TypeVar("Run", ro.RolloutRecord, ro.ExperimentRecord)


def _after(rows: list[Row], key: Callable[[Row], Key], after: Key | None,
           limit: int | None, newest_first: bool = False) -> list[Row]:
    """A keyset page of rows, as the store's SQL reads it."""
    ordered = sorted(rows, key=key, reverse=newest_first)
    if after is not None:
        ordered = [r for r in ordered if (key(r) < after if newest_first else key(r) > after)]
    return ordered[:limit] if limit is not None else ordered


class FakeRegistryStore:
    """The registry's store in memory: implements RegistryStore and ToolStore, and a transaction
    is the store itself, put back as it was when the block raises."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.agents: dict[str, datetime] = {}
        self.versions: dict[tuple[str, int], reg.VersionRecord] = {}
        self.bundles: dict[str, bytes] = {}
        self.endpoints: dict[tuple[str, str], reg.EndpointRecord] = {}
        self.stable: dict[tuple[str, str], list[int]] = {}
        self.webhooks: dict[tuple[str, str], str] = {}
        self.events: list[reg.AuditRecord] = []
        self.requests: dict[str, str] = {}
        self.runs: dict[tuple[str, str, str, int], ro.RunRecord] = {}
        self.tools: dict[tuple[str, str], ToolRecord] = {}
        self.listeners: list[Callable[[str], None]] = []
        self.locked_runs: set[str] = set()
        self._pending: list[str] | None = None

    # -- transactions and the watch --------------------------------------------------------

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[FakeRegistryStore]:
        kept = ("clock", "listeners", "_pending")
        saved = {k: copy.deepcopy(v) for k, v in vars(self).items() if k not in kept}
        notified: list[str] = []
        self._pending = notified
        try:
            yield self
        except BaseException:
            vars(self).update(saved)
            raise
        finally:
            self._pending = None
        # Watchers hear of endpoint changes once they are committed.
        for payload in notified:
            for listener in list(self.listeners):
                listener(payload)

    async def listen_endpoints(self, callback: Callable[[str], None]) -> Callable[[], Awaitable[None]]:
        self.listeners.append(callback)

        async def stop() -> None:
            self.listeners.remove(callback)

        return stop

    # -- agents, versions ------------------------------------------------------------------

    def _agent(self, agent: str) -> reg.AgentRecord:
        numbers = [n for (a, n) in self.versions if a == agent]
        return reg.AgentRecord(agent, self.agents[agent], max(numbers, default=0))

    async def get_agent(self, agent: AgentRef) -> reg.AgentRecord | None:
        return self._agent(agent.agent) if agent.agent in self.agents else None

    async def list_agents(self, after: Key | None, limit: int) -> list[reg.AgentRecord]:
        return _after([self._agent(a) for a in self.agents], lambda a: (a.id,), after, limit)

    async def ensure_agent(self, agent: AgentRef, creator: str) -> bool:
        created = agent.agent not in self.agents
        self.agents.setdefault(agent.agent, self.clock.now())
        return created

    async def lock_agent(self, agent: AgentRef) -> bool:
        return agent.agent in self.agents

    async def get_version(self, version: VersionRef) -> reg.VersionRecord | None:
        for v in self.versions.values():
            if v.agent == version.agent and (v.number == version.number or v.digest == version.digest):
                return v
        return None

    async def insert_version(self, agent: AgentRef, digest: str, data: bytes, manifest: Manifest,
                             creator: str) -> reg.VersionRecord:
        number = 1 + max((n for (a, n) in self.versions if a == agent.agent), default=0)
        self.bundles[digest] = data
        record = reg.VersionRecord(agent.agent, number, digest, len(data), manifest,
                                    self.clock.now(), creator)
        self.versions[(agent.agent, number)] = record
        return record

    async def existing_versions(self, agent: AgentRef, numbers: Collection[int]) -> set[int]:
        return {n for n in numbers if (agent.agent, n) in self.versions}

    async def list_versions(self, agent: AgentRef, after: Key | None, limit: int) -> list[reg.VersionRecord]:
        mine = [v for v in self.versions.values() if v.agent == agent.agent]
        return _after(mine, lambda v: (v.number,), after, limit)

    async def bundle(self, digest: str) -> bytes | None:
        return self.bundles.get(digest)

    # -- endpoints -------------------------------------------------------------------------

    async def get_endpoint(self, endpoint: EndpointRef, *, for_update: bool = False) -> reg.EndpointRecord | None:
        return self.endpoints.get((endpoint.agent, endpoint.endpoint))

    async def list_endpoints(self, agent: AgentRef | None, after: Key | None,
                             limit: int | None) -> list[reg.EndpointRecord]:
        mine = [e for e in self.endpoints.values() if agent is None or e.agent == agent.agent]
        return _after(mine, lambda e: (e.agent, e.id), after, limit)

    async def webhook_url(self, endpoint: EndpointRef) -> str:
        return self.webhooks.get((endpoint.agent, endpoint.endpoint), "")

    async def last_stable(self, endpoint: EndpointRef, not_version: int) -> int | None:
        history = self.stable.get((endpoint.agent, endpoint.endpoint), [])
        return next((v for v in reversed(history) if v != not_version), None)

    async def put_endpoint(self, endpoint: EndpointRef, traffic: tuple[TrafficShare, ...], *,
                           follow_latest: bool = False, description: str = "") -> reg.EndpointRecord:
        key = (endpoint.agent, endpoint.endpoint)
        history = self.stable.setdefault(key, [])
        if len(traffic) == 1 and history[-1:] != [traffic[0].version]:
            history.append(traffic[0].version)
        serving = {s.version for s in traffic}
        rollback = next((v for v in reversed(history) if v not in serving), None)
        current = self.endpoints.get(key)
        now = self.clock.now()
        record = reg.EndpointRecord(
            agent=endpoint.agent, id=endpoint.endpoint,
            follow_latest=current.follow_latest if current else follow_latest,
            salt=current.salt if current else f"salt-{len(self.endpoints)}",
            revision=current.revision + 1 if current else 1, description=description,
            traffic=traffic, create_time=current.create_time if current else now,
            update_time=now, rollback_version=rollback,
        )
        self.endpoints[key] = record
        if self._pending is not None:
            self._pending.append(f"{endpoint.agent}/{endpoint.endpoint}/{record.revision}")
        return record

    # -- audit -----------------------------------------------------------------------------

    async def audit(self, who: Caller, method: str, resource: str, details: reg.AuditDetails) -> None:
        # Kept as written (domain values and all), for tests to look at.
        self.events.append(reg.AuditRecord(len(self.events) + 1, self.clock.now(), who.tenant,
                                            who.user, method, resource, dict(details)))  # type: ignore[arg-type]  # the fake keeps domain values

    async def list_audit(self, prefix: str, after: Key | None, limit: int) -> list[reg.AuditRecord]:
        mine = [e for e in self.events if e.resource.startswith(prefix)]
        return _after(mine, lambda e: (e.id,), after, limit, newest_first=True)

    async def claim_request(self, key: str, resource: str) -> str | None:
        earlier = self.requests.get(key)
        self.requests.setdefault(key, resource)
        return earlier

    # -- runs ------------------------------------------------------------------------------

    def _next_run_id(self, endpoint: EndpointRef, kind: str) -> int:
        ids = [i for (a, e, k, i) in self.runs if (a, e, k) == (endpoint.agent, endpoint.endpoint, kind)]
        return 1 + max(ids, default=0)

    async def active_run(self, endpoint: EndpointRef) -> ro.RunRecord | None:
        return next((r for r in self.runs.values() if r.endpoint == endpoint and r.active), None)

    async def _insert(self, endpoint: EndpointRef, kind: str,
                      make: Callable[[int, datetime], Run]) -> Run | None:
        if await self.active_run(endpoint) is not None:
            return None
        record = make(self._next_run_id(endpoint, kind), self.clock.now())
        self.runs[(endpoint.agent, endpoint.endpoint, kind, record.id)] = record
        return record

    async def insert_rollout(self, endpoint: EndpointRef, stable: int, candidate: int,
                             spec: ro.RolloutSpec, creator: str) -> ro.RolloutRecord | None:
        return await self._insert(endpoint, "rollout", lambda id, now: ro.RolloutRecord(
            endpoint=endpoint, id=id, spec=spec, state=ro.RolloutState.PROGRESSING,
            state_reason="", traffic_start_time=None, end_time=None, create_time=now,
            update_time=now, creator=creator, revision=1, stable_version=stable,
            candidate_version=candidate, current_step=0, current_weight=0.0, last_analysis=None,
            last_check_time=None, step_start_time=now,
        ))

    async def insert_experiment(self, endpoint: EndpointRef, spec: ro.ExperimentSpec, creator: str,
                                traffic_start: datetime) -> ro.ExperimentRecord | None:
        return await self._insert(endpoint, "experiment", lambda id, now: ro.ExperimentRecord(
            endpoint=endpoint, id=id, spec=spec, state=ro.ExperimentState.RUNNING, state_reason="",
            traffic_start_time=traffic_start, end_time=None, create_time=now, update_time=now,
            creator=creator, revision=1,
        ))

    def _run(self, endpoint: EndpointRef, kind: str, id: int | None) -> ro.RunRecord | None:
        mine = [r for (a, e, k, _), r in self.runs.items()
                if (a, e, k) == (endpoint.agent, endpoint.endpoint, kind) and id in (None, r.id)]
        return max(mine, key=lambda r: r.id, default=None)

    async def get_rollout(self, rollout: RolloutRef, *, for_update: bool = False) -> ro.RolloutRecord | None:
        found = self._run(rollout.endpoint, "rollout", rollout.id)
        return found if isinstance(found, ro.RolloutRecord) else None

    async def get_experiment(self, experiment: ExperimentRef, *,
                             for_update: bool = False) -> ro.ExperimentRecord | None:
        found = self._run(experiment.endpoint, "experiment", experiment.id)
        return found if isinstance(found, ro.ExperimentRecord) else None

    async def list_rollouts(self, endpoint: EndpointRef, after: Key | None, limit: int) -> list[ro.RolloutRecord]:
        mine = [r for r in self.runs.values() if isinstance(r, ro.RolloutRecord) and r.endpoint == endpoint]
        return _after(mine, lambda r: (r.id,), after, limit, newest_first=True)

    async def list_experiments(self, endpoint: EndpointRef, after: Key | None,
                               limit: int) -> list[ro.ExperimentRecord]:
        mine = [r for r in self.runs.values() if isinstance(r, ro.ExperimentRecord) and r.endpoint == endpoint]
        return _after(mine, lambda r: (r.id,), after, limit, newest_first=True)

    async def active_runs(self) -> list[ro.RunRecord]:
        return sorted((r for r in self.runs.values() if r.active), key=lambda r: r.create_time)

    async def recent_runs(self, limit: int = 200) -> list[ro.RunRecord]:
        newest: dict[tuple[str, str, str], ro.RunRecord] = {}
        for (a, e, k, _), r in sorted(self.runs.items()):
            newest[(a, e, k)] = r
        return list(newest.values())[:limit]

    async def due_drains(self) -> list[ro.RolloutRecord]:
        return [
            r for r in self.runs.values()
            if isinstance(r, ro.RolloutRecord) and r.end_time is not None
            and r.state in (ro.RolloutState.ROLLED_BACK, ro.RolloutState.ABORTED)
            and r.spec.rollback_policy is ro.SessionPolicy.DRAIN and not r.spec.drained
            and r.end_time + timedelta(seconds=r.spec.drain_timeout_s) < self.clock.now()
        ]

    def _saved(self, run: ro.RunRecord) -> ro.RunRecord | None:
        key = (run.endpoint.agent, run.endpoint.endpoint, run.kind, run.id)
        if self.runs[key].revision != run.revision:
            return None
        self.runs[key] = replace(run, revision=run.revision + 1, update_time=self.clock.now())
        return self.runs[key]

    async def save_rollout(self, rollout: ro.RolloutRecord) -> ro.RolloutRecord | None:
        saved = self._saved(rollout)
        return saved if isinstance(saved, ro.RolloutRecord) else None

    async def save_experiment(self, experiment: ro.ExperimentRecord) -> ro.ExperimentRecord | None:
        saved = self._saved(experiment)
        return saved if isinstance(saved, ro.ExperimentRecord) else None

    async def try_lock_run(self, name: str) -> bool:
        return name not in self.locked_runs

    # -- tools -----------------------------------------------------------------------------

    async def get_tool(self, tenant: str, tool: ToolRef, *, for_update: bool = False) -> ToolRecord | None:
        return self.tools.get((tenant, tool.tool))

    async def list_tools(self, tenant: str, after: Key | None, limit: int) -> list[ToolRecord]:
        mine = [t for t in self.tools.values() if t.tenant == tenant]
        return _after(mine, lambda t: (t.id,), after, limit)

    async def insert_tool(self, tenant: str, tool: ToolRef, spec: ToolSpec, ciphertext: bytes | None,
                          creator: str) -> ToolRecord | None:
        if (tenant, tool.tool) in self.tools:
            return None
        now = self.clock.now()
        record = ToolRecord(tenant, tool.tool, spec, ciphertext, 1, now, now)
        self.tools[(tenant, tool.tool)] = record
        return record

    async def update_tool(self, tenant: str, tool: ToolRef, spec: ToolSpec,
                          ciphertext: bytes | None) -> ToolRecord:
        current = self.tools[(tenant, tool.tool)]
        record = replace(current, spec=spec, secret_ciphertext=ciphertext,
                          revision=current.revision + 1, update_time=self.clock.now())
        self.tools[(tenant, tool.tool)] = record
        return record

    async def delete_tool(self, tenant: str, tool: ToolRef) -> None:
        del self.tools[(tenant, tool.tool)]


class FakeTelemetry:
    """Telemetry's analyses, as a test scripts them; `down` makes every call Unavailable."""

    def __init__(self) -> None:
        self.verdicts: list[ro.Analysis] = []
        self.experiment = ro.ExperimentAnalysis()
        self.down = False
        self.asked: list[tuple[EndpointRef, int, int, datetime, datetime]] = []

    async def compare_versions(self, endpoint: EndpointRef, baseline: int, candidate: int,
                               config: ro.AnalysisConfig, start: datetime,
                               end: datetime) -> ro.Analysis:
        if self.down:
            raise Unavailable("telemetry is unavailable (connection refused); retry shortly")
        self.asked.append((endpoint, baseline, candidate, start, end))
        return self.verdicts.pop(0) if self.verdicts else ro.Analysis(ro.Verdict.INCONCLUSIVE)

    async def analyze_experiment(self, endpoint: EndpointRef, spec: ro.ExperimentSpec,
                                 start: datetime, end: datetime) -> ro.ExperimentAnalysis:
        if self.down:
            raise Unavailable("telemetry is unavailable (connection refused); retry shortly")
        return self.experiment


class FakeSessionRetirement:
    """The sessions service, recording what it was asked to retire."""

    def __init__(self, sessions: int = 3) -> None:
        self.sessions = sessions
        self.retired: list[tuple[VersionRef, EndpointRef, VersionRef | None, str]] = []

    async def retire_version(self, version: VersionRef, endpoint: EndpointRef,
                             migrate_to: VersionRef | None, migrate_digest: str) -> int:
        self.retired.append((version, endpoint, migrate_to, migrate_digest))
        return self.sessions


class Announcements:
    """A Notify that keeps the transitions it is given."""

    def __init__(self) -> None:
        self.transitions: list[ro.Transition] = []

    def __call__(self, transition: ro.Transition) -> None:
        self.transitions.append(transition)

    @property
    def events(self) -> list[str]:
        return [t.event for t in self.transitions]


@dataclass
class RegistryWorld:
    """The registry's domains wired to the fakes above, as app.py wires them to the real ones."""

    clock: FakeClock
    store: FakeRegistryStore
    telemetry: FakeTelemetry
    sessions: FakeSessionRetirement
    announced: Announcements
    rollouts: Rollouts
    experiments: Experiments
    registry: Registry
    controller: RolloutController


def registry_world() -> RegistryWorld:
    clock = FakeClock()
    store = FakeRegistryStore(clock)
    telemetry, sessions, announced = FakeTelemetry(), FakeSessionRetirement(), Announcements()
    rollouts = Rollouts(store, announced, sessions, clock)
    experiments = Experiments(store, announced, telemetry, clock=clock)
    controller = RolloutController(store, rollouts, experiments, telemetry, experiment_check_s=0)
    return RegistryWorld(clock, store, telemetry, sessions, announced, rollouts, experiments,
                         Registry(store, rollouts), controller)


# -- executor ----------------------------------------------------------------------------------


class FakeRedis:
    """The two commands the executor's revocation store uses, with the expiry they were given."""

    def __init__(self) -> None:
        self.ttl: dict[str, int] = {}

    async def set(self, key: str, _value: bytes, ex: int) -> None:
        self.ttl[key] = ex

    async def exists(self, key: str) -> int:
        return int(key in self.ttl)


class FakeRevocations:
    """The credential deny-list (RevocationList) in memory: jti -> the TTL it was given."""

    def __init__(self) -> None:
        self.ttl: dict[str, int] = {}

    async def add(self, jti: str, ttl_s: int) -> None:
        self.ttl[jti] = ttl_s

    async def contains(self, jti: str) -> bool:
        return jti in self.ttl


class FakeSessionLeases:
    """The sessions service as the executor sees it (Sessions), in memory: one state per session, compare-and-set on its
    etag, and the leases taken and released."""

    def __init__(self) -> None:
        self.states: dict[SessionRef, SessionState] = {}
        self.leases: dict[SessionRef, str] = {}
        self.released: list[str] = []
        self.commits: list[FinishedTurn] = []
        self.renewals = 0
        # Set to make the next commits fail as a concurrent writer would make them.
        self.conflict = False

    async def acquire(self, caller: Caller, session: SessionRef, holder: str, ttl_s: int) -> Lease:
        lease = self.leases[session] = f"lease-{len(self.leases) + len(self.released) + 1}"
        return Lease(lease, self.states.get(session, SessionState(b"", "e0", 0)))

    async def renew(self, caller: Caller, session: SessionRef, lease_id: str, ttl_s: int) -> None:
        if self.leases.get(session) != lease_id:
            raise Aborted(f"{session} is leased to another holder")
        self.renewals += 1

    async def release(self, caller: Caller, session: SessionRef, lease_id: str) -> None:
        if self.leases.get(session) == lease_id:
            del self.leases[session]
            self.released.append(lease_id)

    async def commit(
        self, caller: Caller, session: SessionRef, lease_id: str, etag: str, turn: FinishedTurn
    ) -> SessionState:
        current = self.states.get(session, SessionState(b"", "e0", 0))
        if self.conflict or etag != current.etag or self.leases.get(session) != lease_id:
            raise Aborted(f"{session} changed since etag {etag}", reason="ETAG_MISMATCH")
        self.commits.append(turn)
        count = current.turn_count + 1
        committed = self.states[session] = SessionState(turn.state, f"e{count}", count)
        return committed


class FakeBundleRegistry:
    """The registry as the executor sees it (Registry): packed bundles and digests by version,
    and the endpoints it watches, which send one snapshot and then never change."""

    def __init__(
        self, bundles: Mapping[VersionRef, tuple[str, bytes]],
        endpoints: tuple[EndpointTraffic, ...] = (),
    ) -> None:
        self.bundles = dict(bundles)  # version -> (digest, packed)
        self.traffic = endpoints
        self.downloads = 0

    async def download(self, version: VersionRef) -> PackedBundle:
        self.downloads += 1
        return PackedBundle(version, self.bundles[version][1])

    async def digest(self, version: VersionRef) -> str:
        if version not in self.bundles:
            raise NotFound(f"{version} does not exist")
        return self.bundles[version][0]

    def endpoints(self) -> FakeBundleRegistry:
        return self

    async def watch(self) -> AsyncIterator[EndpointUpdate]:
        yield EndpointUpdate(self.traffic, snapshot=True)
        await asyncio.Event().wait()  # quiet until the mirror closes

    async def get(self, ref: EndpointRef) -> EndpointTraffic:
        found = [endpoint for endpoint in self.traffic if endpoint.ref == ref]
        if not found:
            raise NotFound(f"{ref} does not exist")
        return found[0]


class FakeSpanExport:
    """Telemetry's span export (SpanExport): what was forwarded, with its trusted attributes."""

    def __init__(self) -> None:
        self.forwarded: list[tuple[bytes, dict[str, str]]] = []

    def forward(self, encoded: bytes, trusted: Mapping[str, str]) -> None:
        self.forwarded.append((encoded, dict(trusted)))


class FakeWorker:
    """A worker process (WorkerProcess) that is not one: it ends when killed or told to."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.limit_hit: Limit | None = None
        self._ended = asyncio.Event()

    def end(self, code: int, limit: Limit | None = None) -> None:
        if self.returncode is None:
            self.returncode, self.limit_hit = code, limit
            self._ended.set()

    def kill(self) -> None:
        self.end(-9)

    async def wait(self) -> int:
        await self._ended.wait()
        assert self.returncode is not None
        return self.returncode

    def usage(self) -> Usage:
        return Usage(memory_bytes=1 << 20, cpu_seconds=0.5)


# An agent as a script: given the turn and its model and tool handlers (and its worker, to end
# it), it yields output chunks and then the turn's output.
AgentScript = Callable[
    [TurnInput, ModelHandler, ToolHandler, FakeWorker], AsyncIterator[bytes | TurnOutput]
]


class ScriptedSandbox(Sandbox):
    """A sandbox whose agent is a script: no worker process, no socket."""

    def __init__(self, spec: SandboxSpec, script: AgentScript, pid: int) -> None:
        super().__init__(spec)
        self.worker = FakeWorker(pid)
        self.process = self.worker
        self.script = script
        self.turns: list[TurnInput] = []

    async def run(
        self, turn: TurnInput, model: ModelHandler, tools: ToolHandler
    ) -> AsyncGenerator[bytes | TurnOutput, None]:
        self.turns.append(turn)
        async for item in self.script(turn, model, tools, self.worker):
            yield item


class ScriptedStarter(SandboxStarter):
    """Starts ScriptedSandboxes of the bundles the registry holds; no driver is involved."""

    def __init__(self, bundles: BundleCache, workdirs: Path, script: AgentScript) -> None:
        super().__init__(NoDriver(), bundles, workdirs, "", ExecutorMetrics())
        self.script = script
        self.started: list[ScriptedSandbox] = []

    async def start_bundle(self, bundle: UnpackedBundle) -> Sandbox:
        sandbox = ScriptedSandbox(self.spec(bundle), self.script, pid=1000 + len(self.started))
        self.started.append(sandbox)
        return sandbox


class NoDriver:
    """The sandbox driver of scripted sandboxes: there is nothing to spawn or clean up."""

    name = "scripted"

    async def spawn(self, spec: SandboxSpec, socket_fd: int) -> FakeWorker:
        raise AssertionError("scripted sandboxes are not spawned")

    def remove_orphans(self) -> int:
        return 0


# -- telemetry ---------------------------------------------------------------------------------

T = TypeVar("T")


class FakeSpanStore:
    """telemetry's SpanStore in memory, with the filters, order and keyset paging of the SQL."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], SpanRow] = {}

    async def insert_spans(self, rows: Sequence[SpanRow]) -> int:
        new = [r for r in rows if (r.trace_id, r.span_id) not in self.rows]
        self.rows.update({(r.trace_id, r.span_id): r for r in new})
        return len(new)

    def _matching(self, tenant: str, where: SpanFilter) -> list[SpanRow]:
        def matches(r: SpanRow) -> bool:
            names = (
                (r.agent, where.agent),
                (r.version, where.version),
                (r.endpoint, where.endpoint),
                (r.session, where.session),
            )
            return (
                r.tenant == tenant
                and all(ref is None or value == ref.name for value, ref in names)
                and (not where.trace_id or r.trace_id == where.trace_id)
                and (where.start_time is None or r.start_time >= where.start_time)
                and (where.end_time is None or r.start_time < where.end_time)
                and (not where.errors_only or r.status is SpanStatus.ERROR)
            )

        return [r for r in self.rows.values() if matches(r)]

    async def list_spans(
        self, tenant: str, where: SpanFilter, after: Key | None, limit: int
    ) -> list[SpanRow]:
        return _newest_first(
            self._matching(tenant, where),
            lambda r: (r.start_time, r.trace_id, r.span_id),
            after,
            limit,
        )

    async def newest_invocation(self, tenant: str, session: SessionRef) -> SpanRow | None:
        invocations = [
            r for r in self._matching(tenant, SpanFilter(session=session)) if r.is_invocation
        ]
        return max(invocations, key=lambda r: r.start_time, default=None)

    async def has_trace(self, tenant: str, session: SessionRef, trace_id: str) -> bool:
        return bool(self._matching(tenant, SpanFilter(session=session, trace_id=trace_id)))

    async def list_traces(
        self, tenant: str, where: SpanFilter, after: Key | None, limit: int
    ) -> list[TraceSummary]:
        first: dict[str, SpanRow] = {}
        for r in sorted(self._matching(tenant, where), key=lambda r: (r.start_time, r.span_id)):
            if r.is_invocation:
                first.setdefault(r.trace_id, r)
        summaries = [
            TraceSummary(
                r.trace_id,
                r.name,
                r.start_time,
                r.duration_ms,
                r.status,
                r.agent,
                r.version,
                r.endpoint,
                r.session,
                sum(s.trace_id == r.trace_id and s.tenant == tenant for s in self.rows.values()),
            )
            for r in first.values()
        ]
        return _newest_first(summaries, lambda t: (t.start_time, t.trace_id), after, limit)

    async def version_metrics(
        self, tenant: str, agent: AgentRef, start: datetime | None, end: datetime | None
    ) -> list[VersionMetrics]:
        spans = self._matching(tenant, SpanFilter(agent=agent, start_time=start, end_time=end))
        by_version: dict[str, list[SpanRow]] = {}
        for r in spans:
            if r.version:
                by_version.setdefault(r.version, []).append(r)
        return [_version_metrics(version, rows) for version, rows in by_version.items()]


def _newest_first(
    items: Sequence[T], key: Callable[[T], tuple[Any, ...]], after: Key | None, limit: int
) -> list[T]:
    ordered = sorted(items, key=key, reverse=True)
    return [i for i in ordered if after is None or key(i) < tuple(after)][:limit]


def _number(value: object) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _version_metrics(version: str, rows: Sequence[SpanRow]) -> VersionMetrics:
    invocations = [r for r in rows if r.is_invocation]
    tools = [r for r in rows if TOOL_ATTR in r.attributes]
    by_model: dict[str, tuple[int, int]] = {}
    for r in rows:
        model = r.attributes.get(MODEL_ATTR)
        if isinstance(model, str):
            tokens_in, tokens_out = by_model.get(model, (0, 0))
            by_model[model] = (
                tokens_in + _number(r.attributes.get(INPUT_TOKENS_ATTR)),
                tokens_out + _number(r.attributes.get(OUTPUT_TOKENS_ATTR)),
            )
    counts = UsageCounts(
        invocations=len(invocations),
        errors=sum(r.status is SpanStatus.ERROR for r in invocations),
        sessions=len({r.session for r in invocations if r.session}),
        tool_calls=len(tools),
        tool_failures=sum(r.status is SpanStatus.ERROR for r in tools),
        input_tokens=sum(_number(r.attributes.get(INPUT_TOKENS_ATTR)) for r in rows),
        output_tokens=sum(_number(r.attributes.get(OUTPUT_TOKENS_ATTR)) for r in rows),
    )
    return VersionMetrics(version, counts, Latency(), tokens_by_model=by_model)


class FakeScoreStore:
    """telemetry's ScoreStore in memory; each version's observations are given as a list."""

    def __init__(self) -> None:
        self.scores: list[Score] = []
        self.observed: dict[str, list[SessionObservation]] = {}
        self.observation_queries: list[ObservationQuery] = []
        # When scores are recorded: equal times, unless a test moves it, so the id breaks ties.
        self.now = datetime(2025, 1, 1, tzinfo=UTC)

    async def insert_score(self, score: NewScore) -> Score:
        stored = Score(**vars(score), id=len(self.scores) + 1, create_time=self.now)
        self.scores.append(stored)
        return stored

    async def list_scores(
        self, tenant: str, where: ScoreFilter, after: Key | None, limit: int
    ) -> list[Score]:
        matching = [
            s
            for s in self.scores
            if s.tenant == tenant
            and (where.session is None or s.session == where.session.name)
            and (where.version is None or s.version == where.version.name)
            and (not where.name or s.name == where.name)
        ]
        return _newest_first(matching, lambda s: (s.create_time, s.id), after, limit)

    async def observations(self, query: ObservationQuery) -> list[SessionObservation]:
        self.observation_queries.append(query)
        return self.observed.get(query.version.name, [])


class FakeFleet:
    def __init__(self, versions: Sequence[FleetVersion]) -> None:
        self.versions = list(versions)
        self.windows: list[float] = []

    async def fleet_versions(self, latency_window_s: float) -> list[FleetVersion]:
        self.windows.append(latency_window_s)
        return self.versions
