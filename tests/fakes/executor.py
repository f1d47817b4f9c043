"""The executor's seams in memory: the revocation store's Redis and deny-list (and credentials to
put there), the sessions and registry clients, telemetry's span export, and sandboxes whose
agent is a script (no worker process, no socket)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from corral.names import EndpointRef, SessionRef, VersionRef
from services.common import tenancy
from services.common.endpoints import EndpointTraffic, EndpointUpdate
from services.common.errors import Aborted, FailedPrecondition, NotFound
from services.common.identity import Caller
from services.common.requests import REASON_REQUEST_ID_REUSED
from services.common.tenancy import Access, SessionOwner
from services.executor.admission import Slot
from services.executor.bundles import BundleCache, UnpackedBundle
from services.executor.credentials import Credential, CredentialIssuer
from services.executor.drivers.base import Limit, SandboxSpec, Usage
from services.executor.metrics import ExecutorMetrics
from services.executor.model import (
    FinishedTurn,
    Lease,
    LogSink,
    ModelHandler,
    PackedBundle,
    RecordedTurn,
    SessionState,
    ToolHandler,
    TurnInput,
    TurnOutput,
)
from services.executor.sandbox import Sandbox
from services.executor.starter import SandboxStarter


class FakeRedis:
    """The two commands the executor's revocation store uses, with the expiry they were given."""

    def __init__(self) -> None:
        self.ttl: dict[str, int] = {}

    async def set(self, key: str, _value: bytes, ex: int) -> None:
        self.ttl[key] = ex

    async def exists(self, key: str) -> int:
        return int(key in self.ttl)


def mint(issuer: CredentialIssuer, **claims: object) -> Credential:
    """A credential from `issuer` for invocation inv-1 of sessions/s1 on agents/x/versions/3, as
    alice of acme, for the search and calendar tools, expiring in a minute; `claims` change any
    of these."""
    fields: dict[str, object] = {
        "version": "agents/x/versions/3",
        "session": "sessions/s1",
        "invocation_id": "inv-1",
        "tenant": "acme",
        "user": "alice",
        "audience": ["search", "calendar"],
        "expires_at": time.time() + 60,
    }
    return issuer.mint(**{**fields, **claims})  # type: ignore[arg-type]


def forge(token: str, key: Ed25519PrivateKey, kid: str) -> str:
    """`token`'s claims signed with `key` under the key id `kid`: a forgery."""
    claims = jwt.decode(token, options={"verify_signature": False})
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})


def tamper(token: str, **changes: object) -> str:
    """`token` with `changes` made to its claims and its signature kept: a tampered token."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims.update(changes)
    encoded = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{encoded}.{signature}"


class FakeRevocations:
    """The credential deny-list (RevocationList) in memory: jti -> the TTL it was given."""

    def __init__(self) -> None:
        self.ttl: dict[str, int] = {}

    async def add(self, jti: str, ttl_s: int) -> None:
        self.ttl[jti] = ttl_s

    async def contains(self, jti: str) -> bool:
        return jti in self.ttl


class FixedTokens:
    """CallTokens that hand every call the same token, recording what was minted for which tool
    (and until when) and what was revoked."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.minted: list[tuple[str, float]] = []
        self.revoked: list[Credential] = []

    def mint(self, tool: str, expires_at: float) -> Credential:
        self.minted.append((tool, expires_at))
        return Credential(token=self.token, jti=f"jti-{len(self.minted)}", expires_at=expires_at)

    def revoke(self, credential: Credential) -> None:
        self.revoked.append(credential)


class FakeSessionLeases:
    """The sessions service as the executor sees it (Sessions), in memory: one state per session
    of the caller's tenant, compare-and-set on its etag, and the leases taken and released; the
    user who first leased a session owns it, and the tenancy rules of sessions apply."""

    def __init__(self) -> None:
        self.owners: dict[tuple[str, SessionRef], SessionOwner] = {}
        self.states: dict[tuple[str, SessionRef], SessionState] = {}
        self.leases: dict[tuple[str, SessionRef], str] = {}
        self.released: list[str] = []
        self.commits: list[FinishedTurn] = []
        # (tenant, session, request id) -> (request digest, the turn committed under it).
        self.results: dict[tuple[str, SessionRef, str], tuple[str, RecordedTurn]] = {}
        self.renewals = 0
        # Set to make the next commits fail as a concurrent writer would make them.
        self.conflict = False

    async def acquire(self, caller: Caller, session: SessionRef, holder: str, ttl_s: int) -> Lease:
        key = self._allowed(caller, session)
        lease = self.leases[key] = f"lease-{len(self.leases) + len(self.released) + 1}"
        return Lease(lease, self.states.get(key, SessionState(b"", "e0", 0)))

    def _allowed(self, caller: Caller, session: SessionRef) -> tuple[str, SessionRef]:
        key = (caller.tenant, session)
        owner = self.owners.setdefault(key, SessionOwner(caller.tenant, caller.user))
        tenancy.check_session(caller, owner, Access.WRITE, session.name)
        return key

    async def renew(self, caller: Caller, session: SessionRef, lease_id: str, ttl_s: int) -> None:
        if self.leases.get(self._allowed(caller, session)) != lease_id:
            raise Aborted(f"{session} is leased to another holder")
        self.renewals += 1

    async def release(self, caller: Caller, session: SessionRef, lease_id: str) -> None:
        if self.leases.get((caller.tenant, session)) == lease_id:
            del self.leases[caller.tenant, session]
            self.released.append(lease_id)

    async def commit(
        self, caller: Caller, session: SessionRef, lease_id: str, etag: str, turn: FinishedTurn
    ) -> SessionState:
        key = self._allowed(caller, session)
        current = self.states.get(key, SessionState(b"", "e0", 0))
        if self.conflict or etag != current.etag or self.leases.get(key) != lease_id:
            raise Aborted(f"{session} changed since etag {etag}", reason="ETAG_MISMATCH")
        self.commits.append(turn)
        count = current.turn_count + 1
        committed = self.states[key] = SessionState(turn.state, f"e{count}", count)
        if turn.request is not None:
            self.results[(*key, turn.request.request_id)] = (turn.request.digest, RecordedTurn(
                turn=count, output=turn.output, invocation_id=turn.invocation_id,
                trace_id=turn.request.trace_id,
            ))
        return committed

    async def lookup(
        self, caller: Caller, session: SessionRef, request_id: str, digest: str
    ) -> RecordedTurn | None:
        found = self.results.get((*self._allowed(caller, session), request_id))
        if found is None:
            return None
        if found[0] != digest:
            raise FailedPrecondition("another request", reason=REASON_REQUEST_ID_REUSED)
        return found[1]


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

    async def download(self, version: VersionRef, digest: str) -> PackedBundle:
        self.downloads += 1
        return PackedBundle(version, self.bundles[version][1])

    async def digest(self, tenant: str, version: VersionRef) -> str:
        if version not in self.bundles:
            raise NotFound(f"{version} does not exist")
        return self.bundles[version][0]

    def endpoints(self) -> FakeBundleRegistry:
        return self

    async def watch(self) -> AsyncIterator[EndpointUpdate]:
        yield EndpointUpdate(self.traffic, snapshot=True)
        await asyncio.Event().wait()  # quiet until the mirror closes

    async def get(self, tenant: str, ref: EndpointRef) -> EndpointTraffic:
        found = [endpoint for endpoint in self.traffic if endpoint.key == (tenant, ref)]
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
        self, turn: TurnInput, model: ModelHandler, tools: ToolHandler, logs: LogSink | None = None
    ) -> AsyncGenerator[bytes | TurnOutput, None]:
        self.turns.append(turn)
        async for item in self.script(turn, model, tools, self.worker):
            yield item


class ScriptedStarter(SandboxStarter):
    """Starts ScriptedSandboxes of the bundles the registry holds; no driver is involved."""

    def __init__(
        self, bundles: BundleCache, workdirs: Path, script: AgentScript, max_sandboxes: int = 8,
        max_starting: int = 4, start_queue: int = 16,
    ) -> None:
        super().__init__(
            NoDriver(), bundles, workdirs, "", ExecutorMetrics(), max_sandboxes, max_starting,
            start_queue)
        self.script = script
        self.started: list[ScriptedSandbox] = []

    async def start_bundle(self, bundle: UnpackedBundle, slot: Slot) -> Sandbox:
        sandbox = ScriptedSandbox(self.spec(bundle), self.script, pid=1000 + len(self.started))
        sandbox.slot = slot
        slot.start_ends()
        self.started.append(sandbox)
        return sandbox


class NoDriver:
    """The sandbox driver of scripted sandboxes: there is nothing to spawn or clean up."""

    name = "scripted"

    async def spawn(self, spec: SandboxSpec, socket_fd: int) -> FakeWorker:
        raise AssertionError("scripted sandboxes are not spawned")

    def remove_orphans(self) -> int:
        return 0
