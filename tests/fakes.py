"""Fakes for unit tests, in one place: each stands in for one Protocol seam of a service (its
store, clock, id source, or a clients module) so a domain can be tested without a socket."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from corral.names import AgentRef, EndpointRef, SessionRef, VersionRef
from services.common.endpoints import EndpointTraffic, EndpointUpdate
from services.common.errors import Aborted, NotFound, PermissionDenied
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
