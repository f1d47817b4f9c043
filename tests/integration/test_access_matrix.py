"""Issue 11's acceptance matrix: every method Corral serves (read from the proto descriptors, so a
new one is covered unasked), called on one mesh where a victim tenant has real resources, with
no credential, broken credentials, a role too low, another tenant's admin (and forged identity
headers), and, for internal methods, every kind of peer; the victim's state is the same after."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import message, text_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from corral.registry.v1 import (
    keys_pb2,
    keys_pb2_grpc,
    registry_pb2,
    rollouts_pb2,
    rollouts_pb2_grpc,
    tools_pb2,
    tools_pb2_grpc,
)
from corral.router.v1 import router_pb2
from corral.sessions.v1 import sessions_pb2
from corral.telemetry.v1 import telemetry_pb2
from services.common.auth.assertions import ASSERTION_KEY, AssertionSigner
from services.common.auth.interceptor import TENANT_KEY
from services.common.auth.pki import load_identity
from services.common.auth.principal import Principal, Role
from services.common.settings import SERVICES, Settings
from tests import harness
from tests.access_matrix import (
    Metadata,
    Method,
    Resources,
    call,
    outcome,
    references,
    served_methods,
    stream_for,
)
from tests.credentials import AUDIENCE, internal_channel, issuer
from tests.mesh import Mesh, connect
from tests.otlp import export_request, invocation, otlp_span
from tests.rpc import error_details, fails, new_tenant, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

Code = grpc.StatusCode
METHODS = served_methods()
PUBLIC = [m for m in METHODS if m.public]
INTERNAL = [m for m in METHODS if m.internal]
SECRET = "sk-matrix-" + os.urandom(8).hex()

# What the descriptors cannot say: fields that take a resource's id or name without a
# resource_reference annotation.
OVERRIDES: Mapping[str, Mapping[str, str]] = {
    # `tool` is the bare tool id agent.toml names, not `tools/{tool}`.
    "/corral.registry.v1.ToolSecretsService/ResolveTool": {"tool": "tool"},
    # `name` is a key's name or its display name (so, unannotated).
    "/corral.registry.v1.KeyService/RevokeKey": {"name": "key"},
    # A key that verifies: any other string is answered UNAUTHENTICATED, as VerifyKey should.
    "/corral.registry.v1.KeyService/VerifyKey": {"api_key": "api_key"},
}


def request(method: Method, resources: Resources) -> list[message.Message]:
    """What a client sends `method` naming `resources`: from the descriptors, plus OVERRIDES."""
    wanted = OVERRIDES.get(method.path, {})
    values = {"tool": resources.id_of("tool"), "key": resources.name_of("registry.corral.dev/Key"),
              "api_key": resources.values.get("api_key", "")}
    return stream_for(method, resources, {f: values[v] for f, v in wanted.items()})


@dataclass
class World:
    """The mesh, and the victim: a tenant with real resources."""

    mesh: Mesh
    victim: Resources
    revoked_key: str  # an API key of the victim's, revoked
    live_key: str  # one that is not
    markers: tuple[str, ...]  # strings only the victim's data contains
    before: dict[str, str]
    public: dict[str, grpc.aio.Channel]

    @property
    def settings(self) -> Settings:
        return self.mesh.settings

    @property
    def existing(self) -> set[str]:
        """The names of the resources the victim has (experiments: none)."""
        return {name for kind, name in self.victim.names.items() if kind in EXISTING}


EXISTING = {
    "registry.corral.dev/Agent", "registry.corral.dev/Version", "registry.corral.dev/Endpoint",
    "registry.corral.dev/Rollout", "registry.corral.dev/Tool", "registry.corral.dev/Key",
    "sessions.corral.dev/Session", "telemetry.corral.dev/Score",
}


def resource_names(agent: str, session: str, tool: str, key: str, score: str) -> dict[str, str]:
    version = f"agents/{agent}/versions/2"
    endpoint = f"agents/{agent}/endpoints/prod"
    return {
        "registry.corral.dev/Agent": f"agents/{agent}",
        "registry.corral.dev/Version": version,
        "registry.corral.dev/Endpoint": endpoint,
        "registry.corral.dev/Rollout": f"{endpoint}/rollouts/1",
        "registry.corral.dev/Experiment": f"{endpoint}/experiments/1",
        "registry.corral.dev/Tool": f"tools/{tool}",
        "registry.corral.dev/Key": key,
        "registry.corral.dev/AuditEvent": "auditEvents/1",
        "sessions.corral.dev/Session": f"sessions/{session}",
        "telemetry.corral.dev/Score": score,
        # Executors are the platform's, no tenant's: none of them is the victim's.
        "sessions.corral.dev/Executor": "executors/nobody",
    }


def nobody(world: World) -> Resources:
    """Names of nothing, in a tenant that has nothing: what internal methods are called with (an
    allowed service's call could otherwise act on the victim); and a live API key to verify."""
    return Resources(new_tenant(), resource_names("nobody-agent", "nobody", "nobody", "keys/nobody",
                                                  "scores/nobody"), {"api_key": world.live_key})


async def snapshot(world_mesh: Mesh, victim: Resources) -> dict[str, str]:
    """Everything of the victim's the matrix could have touched, read with its own credential."""
    mesh, md, names = world_mesh, world_mesh.me, victim.names
    registry = mesh.registry
    channel = _channel(mesh.settings.addrs["registry"])
    tools = tools_pb2_grpc.ToolServiceStub(channel)
    keys = keys_pb2_grpc.KeyServiceStub(channel)
    agent = names["registry.corral.dev/Agent"]
    session = names["sessions.corral.dev/Session"]
    got: dict[str, message.Message] = {
        "agents": await registry.ListAgents(registry_pb2.ListAgentsRequest(), metadata=md),
        "versions": await registry.ListVersions(
            registry_pb2.ListVersionsRequest(parent=agent), metadata=md),
        "rollouts": await rollouts_pb2_grpc.RolloutServiceStub(channel).ListRollouts(
            rollouts_pb2.ListRolloutsRequest(parent=names["registry.corral.dev/Endpoint"]),
            metadata=md),
        "endpoints": await registry.ListEndpoints(
            registry_pb2.ListEndpointsRequest(parent=agent), metadata=md),
        "session": await mesh.sessions.GetSession(
            sessions_pb2.GetSessionRequest(name=session), metadata=md),
        "state": await mesh.sessions.GetSessionState(
            sessions_pb2.GetSessionStateRequest(name=session), metadata=md),
        "sessions": await mesh.sessions.ListSessions(sessions_pb2.ListSessionsRequest(), metadata=md),
        "tools": await tools.ListTools(tools_pb2.ListToolsRequest(), metadata=md),
        "scores": await mesh.telemetry.ListScores(telemetry_pb2.ListScoresRequest(), metadata=md),
    }
    async with internal_channel(mesh.settings, "registry", "executor") as internal:
        got["resolved"] = await tools_pb2_grpc.ToolSecretsServiceStub(internal).ResolveTool(
            tools_pb2.ResolveToolRequest(tenant=victim.tenant, tool=victim.id_of("tool")))
    listed = await keys.ListKeys(keys_pb2.ListKeysRequest(show_revoked=True), metadata=md)
    for key in listed.keys:
        key.ClearField("last_use_time")  # the revoked key's refused uses may be noted
    got["keys"] = listed
    audit, token = 0, ""
    while True:
        page = await registry.ListAuditEvents(
            registry_pb2.ListAuditEventsRequest(page_size=100, page_token=token), metadata=md)
        audit, token = audit + len(page.events), page.next_page_token
        if not token:
            break
    await channel.close()
    shot = {name: text_format.MessageToString(m) for name, m in got.items()}
    shot["audit events"] = str(audit)
    return shot


def _channel(address: str) -> grpc.aio.Channel:
    """A plain channel: every call carries exactly the metadata the test gives it."""
    return grpc.aio.insecure_channel(address)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp("matrix")
    settings = harness.make_settings(
        database_url, redis_url, tmp, CORRAL_SECRETS_KEY=base64.b64encode(os.urandom(32)).decode())
    platform = await harness.start_mesh(settings)
    try:
        # Telemetry and sessions start before the registry, so they were given no address to
        # verify API keys at: started again, they have it (a deployment configures it up front).
        for name in ("sessions", "telemetry"):
            await platform.hosts[name].stop(grace=0)
        await platform.start("sessions", "telemetry")
        public = {svc: _channel(platform.settings.addrs[svc]) for svc in SERVICES}
        async with connect(platform.settings, platform.hosts, tmp) as mesh:
            yield await _victim(mesh, public)
        for channel in public.values():
            await channel.close()
    finally:
        await platform.stop()


async def _victim(mesh: Mesh, public: dict[str, grpc.aio.Channel]) -> World:
    """Gives the mesh's tenant (the victim) an agent with two versions, an endpoint, a session with
    a turn, a tool with a secret, a score and API keys (one revoked)."""
    md = mesh.me
    agent = await mesh.publish_examples()  # versions 1 and 2
    await mesh.set_split(agent, "prod", [(2, 100)])
    session = f"{mesh.prefix}-victim"
    answer = await mesh.invoke(agent, endpoint="prod", session_id=session)
    registry = public["registry"]
    tool = f"{mesh.prefix}-tool"
    made = await tools_pb2_grpc.ToolServiceStub(registry).CreateTool(tools_pb2.CreateToolRequest(
        tool_id=tool, tool=tools_pb2.Tool(kind=tools_pb2.TOOL_KIND_HTTP, secret=SECRET,
                                          address=f"https://{mesh.prefix}.example.com/t")),
        metadata=md)
    keys = keys_pb2_grpc.KeyServiceStub(registry)
    key = await keys.CreateKey(keys_pb2.CreateKeyRequest(key=keys_pb2.Key(
        display_name="ci", role=keys_pb2.KEY_ROLE_OPERATOR)), metadata=md)
    gone = await keys.CreateKey(keys_pb2.CreateKeyRequest(key=keys_pb2.Key(
        display_name="old", role=keys_pb2.KEY_ROLE_ADMIN)), metadata=md)
    await keys.RevokeKey(keys_pb2.RevokeKeyRequest(name=gone.key.name), metadata=md)
    score = await _score(mesh, agent, f"sessions/{session}")
    await _rollout(mesh, public["registry"], f"agents/{agent}")
    names = resource_names(agent, session, tool, key.key.name, score.name)
    versions = await mesh.registry.ListVersions(
        registry_pb2.ListVersionsRequest(parent=f"agents/{agent}"), metadata=md)
    # A session names its version's digest: the victim's, so a CreateSession is well formed.
    digest = {v.name: v.digest for v in versions.versions}[names["registry.corral.dev/Version"]]
    victim = Resources(mesh.tenant, names, {"version_digest": digest})
    markers = (mesh.tenant, SECRET, made.address, made.etag, key.key.key_id, score.name,
               answer.output.decode()[:40], *(v.digest for v in versions.versions))
    return World(mesh, victim, gone.api_key, key.api_key, markers, await snapshot(mesh, victim),
                 public)


async def _rollout(mesh: Mesh, channel: grpc.aio.Channel, agent: str) -> None:
    """A rollout of version 1 on prod, held at a manual gate (so it stays as it is) with 10% of
    new sessions on the candidate."""
    rollouts = rollouts_pb2_grpc.RolloutServiceStub(channel)
    made = await rollouts.CreateRollout(rollouts_pb2.CreateRolloutRequest(
        parent=f"{agent}/endpoints/prod", rollout=rollouts_pb2.Rollout(
            candidate_version=f"{agent}/versions/1", steps=[
                rollouts_pb2.RolloutStep(set_weight=10),
                rollouts_pb2.RolloutStep(manual=rollouts_pb2.ManualGate()),
                rollouts_pb2.RolloutStep(set_weight=100)])), metadata=mesh.me)
    # Held: past the weight step and paused at the gate (the controller writes both, in two
    # ticks); before that, the "before" snapshot could miss the second write.
    async with asyncio.timeout(30):
        while True:
            held = await rollouts.GetRollout(rollouts_pb2.GetRolloutRequest(name=made.name),
                                             metadata=mesh.me)
            if held.current_step >= 1 and held.state == rollouts_pb2.ROLLOUT_STATE_PAUSED:
                break
            await asyncio.sleep(0.05)


async def _score(mesh: Mesh, agent: str, session: str) -> telemetry_pb2.Score:
    """A score on the victim's session. Telemetry scores sessions it has an invocation span of:
    the executor's tracer sends it only where tracing is set up process-wide (one other test's
    business), so the span is exported here as the executor does, with its certificate."""
    span = otlp_span(uuid.uuid4().int >> 1, 1, 0, 10, {
        **invocation(f"agents/{agent}", 2, session, mesh.tenant), "corral.user": "alice"})
    async with internal_channel(mesh.settings, "telemetry", "executor") as channel:
        otlp = trace_service_pb2_grpc.TraceServiceStub(channel)  # type: ignore[no-untyped-call]
        await otlp.Export(export_request([span]))
    return await mesh.telemetry.RecordScore(telemetry_pb2.RecordScoreRequest(
        score=telemetry_pb2.Score(session=session, score_name="quality", value=0.8)),
        metadata=mesh.me)


def _ids(methods: list[Method], holes: Mapping[str, str] | None = None) -> list[Any]:
    """A case per method; one with a known hole (`holes`: path → what happens) is a strict xfail
    until the hole is fixed."""
    marks = {path: pytest.mark.xfail(strict=True, reason=hole) for path, hole in (holes or {}).items()}
    return [pytest.param(m, id=m.id, marks=[marks[m.path]] if m.path in marks else [])
            for m in methods]


def jwt(tenant: str, role: str = "admin", **broken: Any) -> Metadata:
    token = issuer().mint(tenant, "mallory", roles=(role,) if role else (),
                          audience=broken.pop("audience", AUDIENCE), **broken)
    return (("authorization", f"Bearer {token}"),)


# -- 1. no credential, or one that proves nothing ----------------------------------------------


@pytest.mark.parametrize("method", _ids(PUBLIC))
async def test_without_a_valid_credential_every_public_method_is_unauthenticated(
    world: World, method: Method
) -> None:
    victim = world.victim.tenant
    credentials: dict[str, Metadata] = {
        "none": (),
        "revoked API key": (("authorization", f"Bearer {world.revoked_key}"),),
        "expired JWT": jwt(victim, expires_in=-300),
        "JWT for another audience": jwt(victim, audience="not-corral"),
        "JWT with a bad signature": jwt(victim, key="foreign"),
        "identity headers alone": forged(world),
    }
    channel = world.public[method.service]
    req = request(method, world.victim)
    answers = await asyncio.gather(*(outcome(channel, method, req, md) for md in credentials.values()))
    wrong = {what: (code.name, details) for what, (code, _, details) in zip(credentials, answers)
             if code != Code.UNAUTHENTICATED}
    assert not wrong, wrong


# -- 2. a role one below the one needed ----------------------------------------------------------


@pytest.mark.parametrize("method", _ids(PUBLIC))
async def test_a_role_below_the_one_needed_is_permission_denied(world: World, method: Method) -> None:
    assert method.access.role is not None
    below = Role(method.access.role - 1).label if method.access.role > Role.VIEWER else ""
    md = jwt(world.victim.tenant, role=below)
    code, _, details = await outcome(world.public[method.service], method,
                                     request(method, world.victim), md)
    assert code == Code.PERMISSION_DENIED, (below or "no role", code.name, details)


# -- 3. another tenant's admin naming the victim's resources ----------------------------------


def _kind(method: Method) -> str:
    """What another tenant may be answered: NOT_FOUND for a method about one named resource; for
    a listing, its own (nothing of the victim's); for a create, its own new resource."""
    name = method.name
    if name.startswith(("List", "Watch")) or name in ("GetVersionMetrics", "Export"):
        return "list"
    if name.startswith(("Create", "Publish")) or name == "RecordScore":
        return "create"
    return "named"


# Methods answering OK about the caller's own tenant whatever it names, and the only fields such
# an answer may set.
OWN_TENANT_ANSWERS: Mapping[str, frozenset[str]] = {
    # A router's cache as it stands: revision 0 and no traffic for an endpoint the caller's
    # tenant does not have (the name echoed, and whether the cache is synced).
    "/corral.router.v1.RouterService/GetCachedEndpoint": frozenset({"name", "synced"}),
}

# A `tenant` field naming the victim's tenant: keys' methods say PERMISSION_DENIED (OTHER_TENANT)
# by design, since a tenant's name is not a secret (services/registry/key_rules.py check_manage).
TENANT_NAMED_REFUSAL = "OTHER_TENANT"


def forged(world: World) -> Metadata:
    """Identity headers naming the victim, as an attacker would add them: the tenant, the user,
    and a principal assertion signed with a real service key (which the public port must ignore)."""
    signer = AssertionSigner(load_identity(world.settings.pki_dir, "router"))
    principal = Principal(world.victim.tenant, "alice", frozenset({Role.ADMIN}))
    return ((TENANT_KEY, world.victim.tenant), ("x-corral-user", "alice"),
            (ASSERTION_KEY, signer.sign(principal)))


# Methods about the platform rather than a tenant (the executor fleet): a tenant's administrator
# is refused them, whatever it names.
PLATFORM_METHODS = frozenset({
    "/corral.sessions.v1.FleetService/ListExecutors",
    "/corral.sessions.v1.FleetService/DrainExecutor",
    "/corral.sessions.v1.FleetService/UndrainExecutor",
})
PLATFORM_REFUSAL = "PLATFORM_ADMIN_REQUIRED"

# Holes this matrix found, for the lead to fix (then the case passes and its xfail must go).
CROSS_TENANT_HOLES: dict[str, str] = {}


@pytest.mark.parametrize("method", _ids(PUBLIC, CROSS_TENANT_HOLES))
async def test_another_tenant_never_reaches_the_victims_resources(
    world: World, method: Method
) -> None:
    victim = world.victim
    kind = _kind(method)
    plain = request(method, victim)
    # A `tenant` field is tried both ways: left empty (the caller's own) and naming the victim's.
    tenant_named = request(method, dataclasses.replace(
        victim, values={**victim.values, "tenant": victim.tenant}))
    requests = [plain] + ([tenant_named] if tenant_named != plain else [])
    for req in requests:
        codes = []
        for extra in ((), forged(world)):
            # A tenant of its own each time: what one call creates is not there for the next,
            # so a listing must come back without anything at all of the victim's.
            attacker = who(new_tenant(), "mallory", "admin") + extra
            code, response, details = await outcome(world.public[method.service], method, req,
                                                    attacker)
            seen = (kind, "forged headers" if extra else "plain",
                    "tenant named" if req is tenant_named else "", code.name, details)
            codes.append(code)
            # A create may make the caller's own resource, never one that refers to the victim's.
            refers = set().union(*(references(m) for m in req)) & world.existing
            if code == Code.OK:
                assert not (kind == "create" and refers), (seen, sorted(refers))
                _check_own_answer(world, method, kind, req, response, seen)
            elif code == Code.PERMISSION_DENIED and req is tenant_named:
                err = await _error(world, method, req, attacker)
                assert error_details(err)[0].reason == TENANT_NAMED_REFUSAL, seen
            elif code == Code.PERMISSION_DENIED and method.path in PLATFORM_METHODS:
                err = await _error(world, method, req, attacker)
                assert error_details(err)[0].reason == PLATFORM_REFUSAL, seen
            else:
                assert code not in (Code.PERMISSION_DENIED, Code.UNAUTHENTICATED, Code.UNKNOWN,
                                    Code.INTERNAL), seen
                if kind == "named" or (kind == "create" and refers and code != Code.INVALID_ARGUMENT):
                    assert code == Code.NOT_FOUND, seen
        # Forged identity headers change nothing: the same answer as without them.
        assert codes[0] == codes[1], codes


def _tenants(msg: message.Message) -> list[str]:
    """Every `tenant` field's value in `msg`, at any depth."""
    found = []
    for f, value in msg.ListFields():
        if f.name == "tenant" and isinstance(value, str):
            found.append(value)
        elif f.message_type is not None and not f.message_type.GetOptions().map_entry:
            for inner in value if f.is_repeated else [value]:
                found += _tenants(inner)
    return found


def _check_own_answer(world: World, method: Method, kind: str, sent: list[message.Message],
                      response: message.Message | None, seen: tuple[str, ...]) -> None:
    """An OK answer to another tenant is about that tenant alone: no `tenant` of the victim's,
    none of the victim's data it did not send itself, and for a listing not even the names of
    the victim's resources."""
    shown = text_format.MessageToString(response) if response is not None else ""
    asked = "".join(text_format.MessageToString(m) for m in sent)
    assert world.victim.tenant not in (_tenants(response) if response else []), (seen, shown[:500])
    secrets = list(world.markers)
    if kind == "list":
        secrets += [n for n in world.victim.names.values() if n in world.existing]
    leaked = [m for m in secrets if m and m in shown and m not in asked]
    assert not leaked, (seen, leaked, shown[:500])
    if method.path in OWN_TENANT_ANSWERS:
        assert response is not None
        fields = {f.name for f, _ in response.ListFields()}
        assert fields <= OWN_TENANT_ANSWERS[method.path], (seen, shown[:500])
    else:
        assert kind != "named", (seen, shown[:500])


async def _error(world: World, method: Method, req: list[message.Message], md: Metadata
                 ) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(world.public[method.service], method, req, md)
    return info.value


# -- 5. internal methods: only the services they name, and only over mutual TLS ----------------


@pytest.mark.parametrize("method", _ids(INTERNAL))
async def test_internal_methods_answer_only_the_services_they_name(
    world: World, method: Method
) -> None:
    settings = world.settings
    req = request(method, nobody(world))
    address = settings.internal_addrs[method.service]
    admin = who(new_tenant(), "root", "admin")
    code, _, details = await outcome(world.public[method.service], method, req, admin)
    assert code == Code.PERMISSION_DENIED, ("public port, admin", code.name, details)

    ca = (settings.pki_dir / "ca.crt").read_bytes()
    for what, channel in (
        ("no TLS", grpc.aio.insecure_channel(address)),
        ("TLS without a certificate",
         grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))),
    ):
        async with channel:
            code, _, details = await outcome(channel, method, req)
        assert code == Code.UNAVAILABLE, (what, code.name, details)

    outsiders = sorted(set(SERVICES) - method.access.services)
    for service in outsiders:
        async with internal_channel(settings, method.service, service) as channel:
            code, _, details = await outcome(channel, method, req)
        assert code == Code.PERMISSION_DENIED, (f"as {service}", code.name, details)
    for service in sorted(method.access.services):
        async with internal_channel(settings, method.service, service) as channel:
            code, _, details = await outcome(channel, method, req)
        assert code not in (Code.PERMISSION_DENIED, Code.UNAUTHENTICATED), (
            f"as {service}", code.name, details)


async def test_a_session_pinned_to_another_tenants_version_runs_nothing(world: World) -> None:
    """The hole CreateSession's case finds, end to end: another tenant pins a session of its own
    to the victim's version (its name and digest) and invokes it."""
    victim, attacker = world.victim, who(new_tenant(), "mallory", "invoker")
    agent = victim.name_of("registry.corral.dev/Agent")
    try:
        await world.mesh.sessions.CreateSession(sessions_pb2.CreateSessionRequest(
            session_id="borrowed", session=sessions_pb2.Session(
                agent=agent, version=victim.name_of("registry.corral.dev/Version"),
                version_digest=victim.values["version_digest"])), metadata=attacker)
    except grpc.aio.AioRpcError as refused:
        assert refused.code() == Code.NOT_FOUND, refused.details()
        return
    err = await fails(Code.NOT_FOUND, world.mesh.router.Invoke(router_pb2.InvokeRequest(
        agent=agent, session_id="borrowed", payload=b'{"text": "hi"}'), metadata=attacker))
    assert agent in (err.details() or "")


def test_the_matrix_covers_every_method_of_the_access_table() -> None:
    """The matrix's methods are the descriptors' (a new method joins it by itself), and every
    one of them is public, internal, or one of the few any caller may use."""
    assert len(PUBLIC) >= 50 and len(INTERNAL) >= 10
    others = {m.path for m in METHODS if not (m.public or m.internal)}
    assert others == {
        "/corral.executor.v1.ExecutorService/GetJwks",
        "/corral.executor.v1.ExecutorService/CheckRevocation",
        "/corral.identity.v1.IdentityService/WhoAmI",
    }


# -- 4. last: the victim's state is as it was ----------------------------------------------------


async def test_the_victims_state_is_unchanged_after_the_matrix(world: World) -> None:
    after = await snapshot(world.mesh, world.victim)
    changed = {k: (world.before[k], after[k]) for k in after if after[k] != world.before[k]}
    assert not changed, changed

