"""The executor's domain against fakes: a turn's state in and out, how a turn that fails ends,
busy sessions, credentials revoked when their turn ends, agent spans stamped, the brokered model
call, warm pools fed by the endpoints, and the sandbox listing's pages. Sandboxes are scripted
stand-ins (tests/fakes/executor.py): no worker process, no socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from opentelemetry.context import Context as OtelContext

from corral.bundle import digest_of, pack
from corral.names import EndpointRef, SessionRef, VersionRef
from services.common.auth.principal import Principal, Role
from services.common.endpoints import EndpointTraffic, TrafficShare
from services.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from services.common.identity import Caller
from services.common.settings import ExecutorSettings
from services.executor.broker import ModelBroker
from services.executor.bundles import BundleCache
from services.executor.credentials import CredentialIssuer
from services.executor.drivers.base import Limit
from services.executor.executor import Executor
from services.executor.keys import KeyRing
from services.executor.model import (
    Completed,
    Event,
    Invocation,
    ModelHandler,
    ModelRequest,
    SandboxState,
    Started,
    ToolHandler,
    ToolRequest,
    TurnInput,
    TurnOutput,
)
from services.executor.pools import EndpointWants, WarmPools
from services.executor.providers import ScriptedProvider
from services.executor.sandbox import SandboxCrashed
from tests.fakes.executor import (
    AgentScript,
    FakeBundleRegistry,
    FakeRevocations,
    FakeSessionLeases,
    FakeSpanExport,
    FakeWorker,
    ScriptedStarter,
)

pytestmark = pytest.mark.timeout(20)

ALICE = Caller("acme", "alice", frozenset({Role.INVOKER}))
# Another tenant's user of the same name.
ALICE_OF_BETA = Caller("beta", "alice", frozenset({Role.ADMIN}))
V1 = VersionRef("echo", 1)
V2 = VersionRef("echo", 2)


async def echo(
    turn: TurnInput, model: ModelHandler, tools: ToolHandler, worker: FakeWorker
) -> AsyncIterator[bytes | TurnOutput]:
    """Says what it was sent and keeps it: the new state is the old one plus the payload."""
    yield b"got " + turn.payload
    yield TurnOutput(turn.state + turn.payload, otlp_spans=b"agent-spans")


def bundle(tmp: Path, name: str, toml_extra: str = "") -> tuple[str, bytes]:
    root = tmp / name
    root.mkdir()
    (root / "agent.toml").write_text(f'name = "echo"\nentrypoint = "agent:app"\n{toml_extra}')
    (root / "agent.py").write_text("app = None\n")
    packed = pack(root)
    return digest_of(packed), packed


class World:
    """An executor over fakes, with the bundle of V1 (and V2) in its registry."""

    def __init__(
        self, tmp: Path, script: AgentScript = echo, *, toml_extra: str = "",
        warm_pool_size: int = 0, credentials: CredentialIssuer | None = None,
        endpoints: tuple[EndpointTraffic, ...] = (),
        settings: ExecutorSettings | None = None,
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.bundles = {V1: bundle(tmp, "v1", toml_extra), V2: bundle(tmp, "v2", toml_extra)}
        self.registry = FakeBundleRegistry(self.bundles, endpoints)
        self.sessions = FakeSessionLeases()
        self.spans = FakeSpanExport()
        # No session queue unless asked: a second turn on a busy session is refused at once.
        settings = settings or ExecutorSettings(
            warm_pool_size=warm_pool_size, max_live_sandboxes=8, session_queue=0)
        self.starter = ScriptedStarter(
            BundleCache(self.registry, tmp / "bundles"), tmp / "sandboxes", script,
            max_sandboxes=settings.max_live_sandboxes, max_starting=settings.max_starting,
            start_queue=settings.start_queue,
        )
        self.executor = Executor(
            settings, self.starter, self.sessions, self.spans,
            ModelBroker({"scripted": ScriptedProvider()}), "executor@test",
            credentials=credentials,
        )

    def invocation(self, session: str, payload: bytes = b"hi", version: VersionRef = V1) -> Invocation:
        return Invocation(
            session=SessionRef(session), version=version, digest=self.bundles[version][0],
            endpoint="agents/echo/endpoints/prod", invocation_id=f"inv-{session}-{payload!r}",
            payload=payload, content_type="text/plain",
        )

    async def run(self, session: str, payload: bytes = b"hi", caller: Caller = ALICE) -> list[Event]:
        events = self.executor.execute(caller, self.invocation(session, payload), OtelContext())
        return [event async for event in events]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    w.executor.start()
    yield w
    await w.executor.close()


async def test_a_turn_starts_from_the_committed_state_and_commits_the_next(world: World) -> None:
    first = await world.run("s1", b"a")
    assert isinstance(first[0], Started) and first[1] == b"got a"
    assert isinstance(first[2], Completed) and first[2].turn == 1
    second = await world.run("s1", b"b")
    assert second[1] == b"got b" and isinstance(second[2], Completed) and second[2].turn == 2

    (sandbox,) = world.starter.started  # one sandbox serves the session's turns
    assert [t.state for t in sandbox.turns] == [b"", b"a"]
    assert [c.state for c in world.sessions.commits] == [b"a", b"ab"]
    assert [(c.input, c.output) for c in world.sessions.commits] == [(b"a", b"got a"), (b"b", b"got b")]
    assert sandbox.digest == world.bundles[V1][0] and sandbox.version == V1.name


async def test_the_agents_spans_go_on_with_the_trusted_attributes(world: World) -> None:
    await world.run("s1")
    ((encoded, trusted),) = world.spans.forwarded
    assert encoded == b"agent-spans"
    assert trusted == {
        "corral.agent": "agents/echo", "corral.version": V1.name,
        "corral.endpoint": "agents/echo/endpoints/prod", "corral.session": "sessions/s1",
        "corral.tenant": "acme", "corral.user": "alice", "corral.invocation": "inv-s1-b'hi'",
    }


async def test_another_callers_session_is_refused_and_a_busy_one_aborted(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow(turn: TurnInput, model: ModelHandler, tools: ToolHandler,
                   worker: FakeWorker) -> AsyncIterator[bytes | TurnOutput]:
        await release.wait()
        yield TurnOutput(turn.state)

    world = World(tmp_path, slow)
    running = asyncio.ensure_future(world.run("s1"))
    await until(lambda: bool(world.starter.started) and bool(world.starter.started[0].turns))
    with pytest.raises(Aborted) as busy:
        await world.run("s1")
    assert busy.value.reason == "SESSION_BUSY"
    listing = world.executor.list_sandboxes(ALICE, 0, "")
    assert [s.state for s in listing.sandboxes] == [SandboxState.BUSY]
    release.set()
    await running
    with pytest.raises(PermissionDenied, match="may not change sessions/s1"):
        await world.run("s1", caller=Caller("acme", "bob", frozenset({Role.INVOKER})))
    # An operator of the tenant continues it, in the same sandbox.
    release.clear()
    continuing = asyncio.ensure_future(
        world.run("s1", caller=Caller("acme", "olga", frozenset({Role.OPERATOR})))
    )
    await until(lambda: len(world.starter.started[0].turns) == 2)
    release.set()
    assert isinstance((await continuing)[-1], Completed) and len(world.starter.started) == 1
    await world.executor.close()


async def test_the_same_session_id_in_two_tenants_gets_two_sandboxes(world: World) -> None:
    await world.run("s1", b"a")
    theirs = await world.run("s1", b"b", caller=ALICE_OF_BETA)
    # b's turn started from its own (empty) state in its own sandbox, not from a's.
    assert isinstance(theirs[2], Completed) and theirs[2].turn == 1
    mine, other = world.starter.started
    assert [t.state for t in other.turns] == [b""] and [t.tenant for t in other.turns] == ["beta"]
    assert [s.session for s in world.executor.list_sandboxes(ALICE, 0, "").sandboxes] == [
        "sessions/s1"
    ]
    # Each tenant stops only its own; a service acting for every tenant stops both.
    assert await world.executor.stop_session(ALICE_OF_BETA, SessionRef("s1"))
    assert other.worker.returncode is not None and mine.worker.returncode is None
    assert not await world.executor.stop_session(ALICE_OF_BETA, SessionRef("s1"))
    await world.run("s1", b"c", caller=ALICE_OF_BETA)
    assert await world.executor.stop_session(Principal.of_service("router"), SessionRef("s1"))
    assert world.executor.list_sandboxes(Principal.of_service("ops"), 0, "").sandboxes == []


async def test_a_sandbox_killed_for_its_memory_ends_the_session_with_a_clear_status(
    tmp_path: Path,
) -> None:
    async def greedy(turn: TurnInput, model: ModelHandler, tools: ToolHandler,
                     worker: FakeWorker) -> AsyncIterator[bytes | TurnOutput]:
        yield b"allocating"
        worker.end(-9, Limit.MEMORY)
        raise SandboxCrashed("the sandbox closed its socket")

    world = World(tmp_path, greedy)
    with pytest.raises(ResourceExhausted) as caught:
        await world.run("s1")
    assert caught.value.reason == "MEMORY_LIMIT" and "resources.memory_mb=512" in caught.value.message
    assert world.executor.list_sandboxes(ALICE, 0, "").sandboxes == []
    assert world.sessions.released == ["lease-1"] and world.sessions.commits == []


async def test_a_lost_commit_stops_the_sandbox_and_gives_up_the_lease(world: World) -> None:
    await world.run("s1")
    world.sessions.conflict = True
    with pytest.raises(Aborted, match="changed since"):
        await world.run("s1")
    assert world.executor.list_sandboxes(ALICE, 0, "").sandboxes == []
    assert world.starter.started[0].worker.returncode is not None
    assert world.sessions.released == ["lease-1"]


async def test_model_calls_are_brokered_to_the_pinned_provider(tmp_path: Path) -> None:
    async def asks(turn: TurnInput, model: ModelHandler, tools: ToolHandler,
                   worker: FakeWorker) -> AsyncIterator[bytes | TurnOutput]:
        pieces: list[str] = []

        async def on_chunk(text: str) -> None:
            pieces.append(text)

        answer = await model(ModelRequest("c1", "summarise the quarterly report", stream=True), on_chunk)
        yield answer.text.encode()
        yield f"{len(pieces)} pieces".encode()
        outcome = await tools(ToolRequest("c2", "search", b"{}", "application/json"))
        yield outcome.error_code.encode()
        yield TurnOutput(turn.state)

    world = World(tmp_path, asks)
    events = await world.run("s1")
    assert events[1] == b"[scripted-1] 4 words; key points: summarise, quarterly, report."
    assert int(events[2].split()[0]) > 1  # streamed to the agent in pieces
    assert events[3] == b"UNAVAILABLE"  # this executor has no tool broker


async def test_a_credential_is_minted_for_tools_and_revoked_when_its_turn_ends(
    tmp_path: Path,
) -> None:
    revocations = FakeRevocations()
    issuer = CredentialIssuer(
        KeyRing(tmp_path / "keys", rotation_s=3600, retain_s=7200), revocations, "executor@test"
    )
    tokens: list[str] = []

    async def keeps_token(turn: TurnInput, model: ModelHandler, tools: ToolHandler,
                          worker: FakeWorker) -> AsyncIterator[bytes | TurnOutput]:
        tokens.append(turn.credentials)
        yield TurnOutput(turn.state)

    with_tools = World(tmp_path / "a", keeps_token, toml_extra='\n[[tools]]\nname = "search"\n',
                       credentials=issuer)
    await with_tools.run("s1")
    without = World(tmp_path / "b", keeps_token, credentials=issuer)
    await without.run("s1")
    await with_tools.executor.close()
    assert tokens[0] and tokens[1] == ""  # a version without tools gets none
    (jti,) = revocations.ttl
    assert await issuer.is_revoked(jti)


async def test_warm_pools_keep_the_routed_and_rollback_versions(tmp_path: Path) -> None:
    prod = EndpointTraffic(EndpointRef("echo", "prod"), "salt", 3, (TrafficShare(2, 10_000),),
                           rollback_version=1)
    world = World(tmp_path, warm_pool_size=1, endpoints=(prod,))
    pools = world.executor.pools
    assert isinstance(pools, WarmPools)
    wants = EndpointWants(world.registry, pools)
    world.executor.start()
    wants.start()
    try:
        await until(lambda: len(pools.ready()) == 2)
        assert {v: sorted(w.reasons) for v, w in pools.wanted().items()} == {
            V2: ["routed"], V1: ["rollback"],
        }
        await world.run("s1")  # V1: a hit, and the pool fills again
        await until(lambda: len(pools.ready()) == 2)
        report = {p.version: p for p in pools.report()}
        assert (report[V1.name].hits, report[V1.name].misses) == (1, 0)
        assert report[V1.name].reasons == ("rollback", "active")
        assert len(world.starter.started) == 3
    finally:
        await wants.close()
        await world.executor.close()


async def test_the_listing_pages_oldest_first_with_the_pools_on_the_first_page(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, warm_pool_size=1)
    pools = world.executor.pools
    assert isinstance(pools, WarmPools)
    world.executor.start()
    try:
        for session in ("s1", "s2", "s3"):
            await world.run(session)  # a miss, then hits: each refill starts after the last
            await until(lambda: len(pools.ready()) == 1)
        first = world.executor.list_sandboxes(ALICE, 2, "")
        assert [s.session for s in first.sandboxes] == ["sessions/s1", "sessions/s2"]
        assert [p.version for p in first.pools] == [V1.name] and first.next_page_token
        rest = world.executor.list_sandboxes(ALICE, 2, first.next_page_token)
        assert rest.sandboxes[0].session == "sessions/s3" and rest.pools == []
        everything = world.executor.list_sandboxes(ALICE, 0, "")
        assert [s.session for s in everything.sandboxes[:3]] == ["sessions/s1", "sessions/s2", "sessions/s3"]
        assert everything.next_page_token == ""
        assert everything.sandboxes[0].memory_bytes == 1 << 20 and everything.sandboxes[0].pid == 1000
        with pytest.raises(InvalidArgument, match="page_token"):
            world.executor.list_sandboxes(ALICE_OF_BETA, 2, first.next_page_token)
    finally:
        await world.executor.close()


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


class _TenantsVersions:
    """A registry in which only tenant "acme" has agents/a/versions/1, with digest D1."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, VersionRef]] = []

    async def digest(self, tenant: str, version: VersionRef) -> str:
        self.asked.append((tenant, version))
        if (tenant, version) != ("acme", VersionRef.parse("agents/a/versions/1")):
            raise NotFound(f"{version} does not exist")
        return "sha256:" + "d1" * 32


async def test_a_pin_runs_only_a_version_of_the_callers_tenant(tmp_path: Path) -> None:
    """Bundles are fetched by digest for every tenant, so a session's pin (which its creator
    wrote) must name a version of its own tenant with those bytes."""
    registry = _TenantsVersions()
    bundles = BundleCache(registry, tmp_path)  # type: ignore[arg-type]
    v1, digest = VersionRef.parse("agents/a/versions/1"), "sha256:" + "d1" * 32
    await bundles.check_pin("acme", v1, digest)
    await bundles.check_pin("acme", v1, digest)
    assert registry.asked == [("acme", v1)]  # versions never change: asked once
    with pytest.raises(NotFound):
        await bundles.check_pin("mallory", v1, digest)
    with pytest.raises(FailedPrecondition, match="pinned to"):
        await bundles.check_pin("acme", v1, "sha256:" + "ee" * 32)


async def test_a_collected_bundle_leaves_the_disk_once_no_sandbox_runs_it(tmp_path: Path) -> None:
    digest, packed = bundle(tmp_path, "v1")
    registry = FakeBundleRegistry({V1: (digest, packed)})
    bundles = BundleCache(registry, tmp_path / "bundles")
    unpacked = (await bundles.ensure(V1, digest)).path
    bundles.collected([digest])
    await bundles.sweep(running={digest})  # a sandbox still runs it: kept
    assert unpacked.is_dir()
    await bundles.sweep(running=set())
    assert not unpacked.exists()
    # Published again later, it is fetched again and no longer counts as collected.
    await bundles.ensure(V1, digest)
    await bundles.sweep(running=set())
    assert unpacked.is_dir() and registry.downloads == 2
