"""The registry's seams in memory (its store, telemetry's analyses, the sessions it retires, the
transitions it announces), and its domains wired to them as app.py wires the real ones."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TypeVar

from corral.manifest import Manifest
from corral.names import (
    AgentRef,
    EndpointRef,
    ExperimentRef,
    RolloutRef,
    ToolRef,
    VersionRef,
)
from services.common.endpoints import TrafficShare
from services.common.errors import Unavailable
from services.common.execution import StartFailure
from services.common.identity import Caller
from services.common.paging import Key
from services.registry import model as reg
from services.registry import rollout_model as ro
from services.registry.controller import RolloutController
from services.registry.experiments import Experiments
from services.registry.registry import Registry
from services.registry.rollouts import Rollouts
from services.registry.tool_model import ToolRecord, ToolSpec
from tests.fakes.common import FakeClock, keyset_page

# The tenant the registry's unit tests call as.
REGISTRY_TENANT = "acme"

Run = TypeVar("Run", ro.RolloutRecord, ro.ExperimentRecord)


class FakeRegistryStore:
    """The registry's store in memory: implements RegistryStore and ToolStore, and a transaction
    is the store itself, put back as it was when the block raises."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        # Keyed by tenant first, as the tables are.
        self.agents: dict[tuple[str, str], datetime] = {}
        self.versions: dict[tuple[str, str, int], reg.VersionRecord] = {}
        self.bundles: dict[str, bytes] = {}
        self.endpoints: dict[tuple[str, str, str], reg.EndpointRecord] = {}
        self.stable: dict[tuple[str, str, str], list[int]] = {}
        self.webhooks: dict[tuple[str, str, str], str] = {}
        self.events: list[reg.AuditRecord] = []
        self.requests: dict[tuple[str, str], str] = {}
        self.runs: dict[tuple[str, str, str, str, int], ro.RunRecord] = {}
        self.tools: dict[tuple[str, str], ToolRecord] = {}
        self.listeners: list[Callable[[str], None]] = []
        self.connections: list[FakeListener] = []
        # How many of the next listen_endpoints calls fail.
        self.listen_failures = 0
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

    async def listen_endpoints(
        self,
        callback: Callable[[str], None],
        on_deletion: Callable[[str], None],  # nothing is ever deleted here
        on_lost: Callable[[], None],
    ) -> FakeListener:
        if self.listen_failures:
            self.listen_failures -= 1
            raise ConnectionRefusedError("PostgreSQL is restarting")
        listener = FakeListener(self, callback, on_lost)
        self.listeners.append(callback)
        self.connections.append(listener)
        return listener

    def lose_listening_connection(self, *, silently: bool = False) -> None:
        """The LISTEN connection drops: closed (on_lost is called) or, `silently`, no longer
        answering."""
        for listener in self.connections:
            listener.closed = True
            self.listeners.remove(listener.callback)
            if not silently:
                listener.on_lost()
        self.connections.clear()

    # -- agents, versions ------------------------------------------------------------------

    def _agent(self, tenant: str, agent: str) -> reg.AgentRecord:
        numbers = [n for (t, a, n) in self.versions if (t, a) == (tenant, agent)]
        return reg.AgentRecord(tenant, agent, self.agents[(tenant, agent)], max(numbers, default=0))

    async def get_agent(self, tenant: str, agent: AgentRef) -> reg.AgentRecord | None:
        return self._agent(tenant, agent.agent) if (tenant, agent.agent) in self.agents else None

    async def list_agents(self, tenant: str, after: Key | None, limit: int) -> list[reg.AgentRecord]:
        mine = [self._agent(t, a) for (t, a) in self.agents if t == tenant]
        return keyset_page(mine, lambda a: (a.id,), after, limit)

    async def ensure_agent(self, tenant: str, agent: AgentRef, creator: str) -> bool:
        created = (tenant, agent.agent) not in self.agents
        self.agents.setdefault((tenant, agent.agent), self.clock.now())
        return created

    async def lock_agent(self, tenant: str, agent: AgentRef) -> bool:
        return (tenant, agent.agent) in self.agents

    async def get_version(self, tenant: str, version: VersionRef) -> reg.VersionRecord | None:
        for v in self.versions.values():
            if (v.tenant, v.agent) == (tenant, version.agent) and (
                v.number == version.number or v.digest == version.digest
            ):
                return v
        return None

    async def version_with_digest(self, version: VersionRef) -> reg.VersionRecord | None:
        return next((v for v in self.versions.values()
                     if v.agent == version.agent and v.digest == version.digest), None)

    async def insert_version(self, tenant: str, agent: AgentRef, digest: str, data: bytes,
                             manifest: Manifest, creator: str,
                             state: reg.VersionState) -> reg.VersionRecord:
        number = 1 + max((n for (t, a, n) in self.versions if (t, a) == (tenant, agent.agent)),
                         default=0)
        self.bundles[digest] = data
        record = reg.VersionRecord(tenant, agent.agent, number, digest, len(data), manifest,
                                    self.clock.now(), creator, state)
        self.versions[(tenant, agent.agent, number)] = record
        return record

    async def settle_version(self, tenant: str, version: VersionRef, state: reg.VersionState,
                             failure: StartFailure | None) -> reg.VersionRecord:
        key = (tenant, version.agent, version.number)
        record = self.versions[key] = replace(self.versions[key], state=state, failure=failure)
        return record

    async def version_states(self, tenant: str, agent: AgentRef,
                             numbers: Collection[int]) -> dict[int, reg.VersionState]:
        return {n: self.versions[(tenant, agent.agent, n)].state for n in numbers
                if (tenant, agent.agent, n) in self.versions}

    async def list_versions(self, tenant: str, agent: AgentRef, after: Key | None,
                            limit: int) -> list[reg.VersionRecord]:
        mine = [v for v in self.versions.values() if (v.tenant, v.agent) == (tenant, agent.agent)]
        return keyset_page(mine, lambda v: (v.number,), after, limit)

    async def bundle(self, digest: str) -> bytes | None:
        return self.bundles.get(digest)

    # -- endpoints -------------------------------------------------------------------------

    async def get_endpoint(self, tenant: str, endpoint: EndpointRef, *,
                           for_update: bool = False) -> reg.EndpointRecord | None:
        return self.endpoints.get((tenant, endpoint.agent, endpoint.endpoint))

    async def list_endpoints(self, tenant: str, agent: AgentRef | None, after: Key | None,
                             limit: int) -> list[reg.EndpointRecord]:
        return keyset_page(await self.watched_endpoints(tenant, agent), lambda e: (e.agent, e.id),
                           after, limit)

    async def watched_endpoints(self, tenant: str | None,
                                agent: AgentRef | None) -> list[reg.EndpointRecord]:
        return [e for e in self.endpoints.values()
                if tenant in (None, e.tenant) and (agent is None or e.agent == agent.agent)]

    async def webhook_url(self, tenant: str, endpoint: EndpointRef) -> str:
        return self.webhooks.get((tenant, endpoint.agent, endpoint.endpoint), "")

    async def last_stable(self, tenant: str, endpoint: EndpointRef, not_version: int) -> int | None:
        history = self.stable.get((tenant, endpoint.agent, endpoint.endpoint), [])
        return next((v for v in reversed(history) if v != not_version), None)

    async def put_endpoint(self, tenant: str, endpoint: EndpointRef,
                           traffic: tuple[TrafficShare, ...], *, follow_latest: bool = False,
                           description: str = "") -> reg.EndpointRecord:
        key = (tenant, endpoint.agent, endpoint.endpoint)
        history = self.stable.setdefault(key, [])
        if len(traffic) == 1 and history[-1:] != [traffic[0].version]:
            history.append(traffic[0].version)
        serving = {s.version for s in traffic}
        rollback = next((v for v in reversed(history) if v not in serving), None)
        current = self.endpoints.get(key)
        now = self.clock.now()
        record = reg.EndpointRecord(
            tenant=tenant, agent=endpoint.agent, id=endpoint.endpoint,
            follow_latest=current.follow_latest if current else follow_latest,
            salt=current.salt if current else f"salt-{len(self.endpoints)}",
            revision=current.revision + 1 if current else 1, description=description,
            traffic=traffic, create_time=current.create_time if current else now,
            update_time=now, rollback_version=rollback,
        )
        self.endpoints[key] = record
        if self._pending is not None:
            self._pending.append(f"{tenant}/{endpoint.agent}/{endpoint.endpoint}/{record.revision}")
        return record

    # -- audit -----------------------------------------------------------------------------

    async def audit(self, who: Caller, method: str, resource: str, details: reg.AuditDetails) -> None:
        # Kept as written (domain values and all), for tests to look at.
        self.events.append(reg.AuditRecord(len(self.events) + 1, self.clock.now(), who.tenant,
                                            who.describe(), method, resource, dict(details)))  # type: ignore[arg-type]  # the fake keeps domain values

    async def list_audit(self, tenant: str, prefix: str, after: Key | None,
                         limit: int) -> list[reg.AuditRecord]:
        mine = [e for e in self.events if e.tenant == tenant and e.resource.startswith(prefix)]
        return keyset_page(mine, lambda e: (e.id,), after, limit, newest_first=True)

    async def claim_request(self, tenant: str, key: str, resource: str) -> str | None:
        earlier = self.requests.get((tenant, key))
        self.requests.setdefault((tenant, key), resource)
        return earlier

    # -- runs ------------------------------------------------------------------------------

    @staticmethod
    def _key(run: ro.RunRecord) -> tuple[str, str, str, str, int]:
        return (run.tenant, run.endpoint.agent, run.endpoint.endpoint, run.kind, run.id)

    def _next_run_id(self, tenant: str, endpoint: EndpointRef, kind: str) -> int:
        ids = [i for (t, a, e, k, i) in self.runs
               if (t, a, e, k) == (tenant, endpoint.agent, endpoint.endpoint, kind)]
        return 1 + max(ids, default=0)

    async def active_run(self, tenant: str, endpoint: EndpointRef) -> ro.RunRecord | None:
        return next((r for r in self.runs.values()
                     if (r.tenant, r.endpoint) == (tenant, endpoint) and r.active), None)

    async def _insert(self, tenant: str, endpoint: EndpointRef, kind: str,
                      make: Callable[[int, datetime], Run]) -> Run | None:
        if await self.active_run(tenant, endpoint) is not None:
            return None
        record = make(self._next_run_id(tenant, endpoint, kind), self.clock.now())
        self.runs[self._key(record)] = record
        return record

    async def insert_rollout(self, tenant: str, endpoint: EndpointRef, stable: int, candidate: int,
                             spec: ro.RolloutSpec, creator: str) -> ro.RolloutRecord | None:
        return await self._insert(tenant, endpoint, "rollout", lambda id, now: ro.RolloutRecord(
            tenant=tenant, endpoint=endpoint, id=id, spec=spec, state=ro.RolloutState.PROGRESSING,
            state_reason="", traffic_start_time=None, end_time=None, create_time=now,
            update_time=now, creator=creator, revision=1, stable_version=stable,
            candidate_version=candidate, current_step=0, current_weight=0.0, last_analysis=None,
            last_check_time=None, step_start_time=now,
        ))

    async def insert_experiment(self, tenant: str, endpoint: EndpointRef, spec: ro.ExperimentSpec,
                                creator: str, traffic_start: datetime) -> ro.ExperimentRecord | None:
        return await self._insert(tenant, endpoint, "experiment", lambda id, now: ro.ExperimentRecord(
            tenant=tenant, endpoint=endpoint, id=id, spec=spec, state=ro.ExperimentState.RUNNING,
            state_reason="", traffic_start_time=traffic_start, end_time=None, create_time=now,
            update_time=now, creator=creator, revision=1,
        ))

    def _run(self, tenant: str, endpoint: EndpointRef, kind: str,
             id: int | None) -> ro.RunRecord | None:
        mine = [r for (t, a, e, k, _), r in self.runs.items()
                if (t, a, e, k) == (tenant, endpoint.agent, endpoint.endpoint, kind)
                and id in (None, r.id)]
        return max(mine, key=lambda r: r.id, default=None)

    async def get_rollout(self, tenant: str, rollout: RolloutRef, *,
                          for_update: bool = False) -> ro.RolloutRecord | None:
        found = self._run(tenant, rollout.endpoint, "rollout", rollout.id)
        return found if isinstance(found, ro.RolloutRecord) else None

    async def get_experiment(self, tenant: str, experiment: ExperimentRef, *,
                             for_update: bool = False) -> ro.ExperimentRecord | None:
        found = self._run(tenant, experiment.endpoint, "experiment", experiment.id)
        return found if isinstance(found, ro.ExperimentRecord) else None

    async def list_rollouts(self, tenant: str, endpoint: EndpointRef, after: Key | None,
                            limit: int) -> list[ro.RolloutRecord]:
        mine = [r for r in self.runs.values() if isinstance(r, ro.RolloutRecord)
                and (r.tenant, r.endpoint) == (tenant, endpoint)]
        return keyset_page(mine, lambda r: (r.id,), after, limit, newest_first=True)

    async def list_experiments(self, tenant: str, endpoint: EndpointRef, after: Key | None,
                               limit: int) -> list[ro.ExperimentRecord]:
        mine = [r for r in self.runs.values() if isinstance(r, ro.ExperimentRecord)
                and (r.tenant, r.endpoint) == (tenant, endpoint)]
        return keyset_page(mine, lambda r: (r.id,), after, limit, newest_first=True)

    async def active_runs(self) -> list[ro.RunRecord]:
        return sorted((r for r in self.runs.values() if r.active), key=lambda r: r.create_time)

    async def recent_runs(self, limit: int = 200) -> list[ro.RunRecord]:
        newest: dict[tuple[str, str, str, str], ro.RunRecord] = {}
        for (t, a, e, k, _), r in sorted(self.runs.items()):
            newest[(t, a, e, k)] = r
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
        key = self._key(run)
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

    async def try_lock_run(self, run: ro.RunRecord) -> bool:
        return run.name not in self.locked_runs

    # -- tools -----------------------------------------------------------------------------

    async def get_tool(self, tenant: str, tool: ToolRef, *, for_update: bool = False) -> ToolRecord | None:
        return self.tools.get((tenant, tool.tool))

    async def list_tools(self, tenant: str, after: Key | None, limit: int) -> list[ToolRecord]:
        mine = [t for t in self.tools.values() if t.tenant == tenant]
        return keyset_page(mine, lambda t: (t.id,), after, limit)

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
        self.tenants: list[str] = []

    async def compare_versions(self, tenant: str, endpoint: EndpointRef, baseline: int, candidate: int,
                               config: ro.AnalysisConfig, start: datetime,
                               end: datetime) -> ro.Analysis:
        if self.down:
            raise Unavailable("telemetry is unavailable (connection refused); retry shortly")
        self.tenants.append(tenant)
        self.asked.append((endpoint, baseline, candidate, start, end))
        return self.verdicts.pop(0) if self.verdicts else ro.Analysis(ro.Verdict.INCONCLUSIVE)

    async def analyze_experiment(self, tenant: str, endpoint: EndpointRef, spec: ro.ExperimentSpec,
                                 start: datetime, end: datetime) -> ro.ExperimentAnalysis:
        if self.down:
            raise Unavailable("telemetry is unavailable (connection refused); retry shortly")
        return self.experiment


class FakeSessionRetirement:
    """The sessions service, recording what it was asked to retire."""

    def __init__(self, sessions: int = 3) -> None:
        self.sessions = sessions
        self.retired: list[tuple[VersionRef, EndpointRef, VersionRef | None, str]] = []

    async def retire_version(self, tenant: str, version: VersionRef, endpoint: EndpointRef,
                             migrate_to: VersionRef | None, migrate_digest: str) -> int:
        self.retired.append((version, endpoint, migrate_to, migrate_digest))
        return self.sessions


class FakeVersionStarts:
    """An executor's start check, as a test scripts it: versions whose digest is in `failing`
    cannot start; `down` makes every call Unavailable."""

    def __init__(self) -> None:
        self.failing: dict[str, StartFailure] = {}
        self.down = False
        self.started: list[VersionRef] = []

    async def check_start(self, tenant: str, version: VersionRef, digest: str) -> StartFailure | None:
        if self.down:
            raise Unavailable("executor is unavailable (connection refused); retry shortly")
        self.started.append(version)
        return self.failing.get(digest)


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


@dataclass
class FakeListener:
    store: FakeRegistryStore
    callback: Callable[[str], None]
    on_lost: Callable[[], None]
    closed: bool = False

    def __deepcopy__(self, memo: object) -> FakeListener:
        return self  # a connection is not part of the rows a transaction rolls back

    async def alive(self) -> bool:
        return not self.closed

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.store.listeners.remove(self.callback)
            self.store.connections.remove(self)
