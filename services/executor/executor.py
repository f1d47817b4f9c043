"""The executor's domain: a sandbox per session that lives across turns, the session lease,
state loaded and committed around each invocation, and the invocation span."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from opentelemetry import trace
from opentelemetry.context import Context as OtelContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from corral import names
from corral.manifest import Manifest, parse_manifest
from corral.sandbox.v1 import sandbox_pb2 as pb
from services.common.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from services.common.identity import Caller
from services.common.settings import ExecutorSettings
from services.executor.broker import ModelBroker
from services.executor.credentials import Credential, CredentialIssuer
from services.executor.drivers import SandboxDriver, SandboxSpec
from services.executor.metrics import ExecutorMetrics
from services.executor.pools import WarmPools
from services.executor.sandbox import AgentFailed, Done, Sandbox, SandboxCrashed
from services.executor.store import BundleCache, SessionsClient, SpanForwarder
from services.executor.tools import ToolBroker

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)
REAP_INTERVAL_S = 5.0
# Stamped by the executor on the agent's own spans, whatever the agent's code put there.
TRUSTED_SPAN_KEYS = ("corral.agent", "corral.version", "corral.endpoint", "corral.session",
                     "corral.tenant", "corral.user", "corral.invocation")


@dataclass(frozen=True)
class Invocation:
    session: str
    version: str
    digest: str
    endpoint: str
    invocation_id: str
    payload: bytes
    content_type: str


@dataclass(frozen=True)
class Started:
    invocation_id: str
    trace_id: str


@dataclass(frozen=True)
class Completed:
    duration_ms: int
    turn: int


Event = Started | bytes | Completed


class AgentError(Internal):
    """The agent's code raised; the message carries its exception type and message."""


class Executor:
    def __init__(
        self,
        settings: ExecutorSettings,
        data_dir: Path,
        driver: SandboxDriver,
        sessions: SessionsClient,
        bundles: BundleCache,
        spans: SpanForwarder,
        broker: ModelBroker,
        holder: str,
        metrics: ExecutorMetrics | None = None,
        credentials: CredentialIssuer | None = None,
        tools: ToolBroker | None = None,
    ) -> None:
        self.settings = settings
        self.workdirs = data_dir / "sandboxes"
        self.driver = driver
        self.sessions = sessions
        self.bundles = bundles
        self.spans = spans
        self.broker = broker
        self.holder = holder
        self.sandboxes: dict[str, Sandbox] = {}
        self._owners: dict[str, Caller] = {}
        self._busy: set[str] = set()
        self._manifests: dict[str, Manifest] = {}
        self._reaper: asyncio.Task[None] | None = None
        self.metrics = metrics or ExecutorMetrics()
        self.credentials = credentials
        self.tools = tools
        self._revocations: set[asyncio.Task[None]] = set()
        self.pools = (
            WarmPools(self.new_sandbox, settings.warm_pool_size, settings.warm_pool_max_total, self.metrics)
            if settings.warm_pool_size > 0 else None
        )

    # -- lifecycle of the executor -------------------------------------------------------

    def start(self) -> None:
        # Scratch directories a crashed predecessor on this data dir left (the process driver's;
        # bwrap's scratch is a tmpfs that died with its sandbox).
        if self.workdirs.is_dir():
            for leftover in self.workdirs.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
        self._reaper = asyncio.create_task(self._reap_forever())
        if self.pools is not None:
            self.pools.start()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self.pools is not None:
            await self.pools.close()
        await asyncio.gather(*(self.stop_session(s) for s in list(self.sandboxes)), return_exceptions=True)
        if self._revocations:
            await asyncio.wait(self._revocations, timeout=2)

    # -- one invocation ------------------------------------------------------------------

    async def execute(self, caller: Caller, inv: Invocation, parent: OtelContext) -> AsyncIterator[Event]:
        self._validate(inv)
        if inv.session in self._busy:
            raise _busy(inv.session)
        self._busy.add(inv.session)
        try:
            # aclosing: closing this generator must close the turn's too, so that its clean-up
            # (stopping a worker that is mid-turn) runs before the session is free again.
            async with contextlib.aclosing(self._execute(caller, inv, parent)) as events:
                async for event in events:
                    yield event
        finally:
            self._busy.discard(inv.session)

    async def _execute(self, caller: Caller, inv: Invocation, parent: OtelContext) -> AsyncIterator[Event]:
        started = time.monotonic()
        ref = names.parse_version(inv.version)
        attributes = {
            "corral.agent": names.agent_name(ref.agent),
            "corral.version": inv.version,
            "corral.version.number": ref.number,
            "corral.endpoint": inv.endpoint,
            "corral.session": inv.session,
            "corral.tenant": caller.tenant,
            "corral.user": caller.user,
            "corral.invocation": inv.invocation_id,
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": ref.agent,
        }
        # An explicit span and context rather than "current span": this generator is suspended at
        # every yield, and the ambient context must not leak into the caller's.
        span = tracer.start_span(
            f"invoke_agent {ref.agent}", context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
        )
        span_ctx = trace.set_span_in_context(span, parent)
        credential: Credential | None = None
        try:
            trace_id = format(span.get_span_context().trace_id, "032x")
            try:
                sandbox = await self._sandbox_for(caller, inv)
                manifest = self._manifests[inv.digest]
                yield Started(inv.invocation_id, trace_id)
                carrier: dict[str, str] = {}
                TraceContextTextMapPropagator().inject(carrier, context=span_ctx)
                deadline = time.time() + manifest.timeout_s
                credential = self._mint(caller, inv, manifest, deadline)
                invocation = pb.Invocation(
                    invocation_id=inv.invocation_id, session_id=names.parse_session(inv.session),
                    version=inv.version, payload=inv.payload, content_type=inv.content_type,
                    state=sandbox.state, traceparent=carrier.get("traceparent", ""),
                    endpoint=inv.endpoint, tenant=caller.tenant, user=caller.user,
                    credentials=credential.token if credential else "",
                    deadline_unix_ms=int(deadline * 1000),
                )

                async def model(call: pb.ModelCall) -> pb.ModelResult:
                    async def chunk(text: str) -> None:
                        await sandbox.send(pb.HostFrame(
                            model_chunk=pb.ModelChunk(call_id=call.call_id, text=text)))

                    return await self.broker.call(
                        manifest.model_provider, manifest.model_id, manifest.model_params, call,
                        attributes, span_ctx, deadline=time.monotonic() + (deadline - time.time()),
                        on_chunk=chunk if call.stream else None,
                    )

                async def tool(call: pb.ToolCall) -> pb.ToolResult:
                    if self.tools is None:
                        return pb.ToolResult(error="this executor has no tool broker",
                                             error_code="UNAVAILABLE")
                    outcome = await self.tools.call(
                        tenant=caller.tenant, tool=call.tool, allowed=[t.name for t in manifest.tools],
                        token=credential.token if credential else "", payload=call.payload,
                        content_type=call.content_type, timeout_s=call.timeout_s or None,
                        deadline=deadline, attributes=attributes, context=span_ctx,
                    )
                    return pb.ToolResult(
                        payload=outcome.payload, content_type=outcome.content_type,
                        error=outcome.error, error_code=outcome.error_code,
                    )

                output: list[bytes] = []
                done: Done | None = None
                try:
                    async with asyncio.timeout(manifest.timeout_s):
                        async for item in sandbox.invoke(invocation, model, tool):
                            if isinstance(item, Done):
                                done = item
                            else:
                                output.append(item)
                                yield item
                except TimeoutError:
                    await self._drop(inv.session)
                    raise DeadlineExceeded(
                        f"{inv.session}: the agent did not finish within resources.timeout_s="
                        f"{manifest.timeout_s}s", reason="INVOCATION_TIMEOUT",
                    ) from None
                except AgentFailed as exc:
                    raise AgentError(
                        f"the agent raised {exc.error_type}: {exc.message}", reason="AGENT_ERROR",
                        metadata={"error_type": exc.error_type},
                    ) from None
                except SandboxCrashed as exc:
                    process = sandbox.process
                    await self._drop(inv.session)  # waits for the driver's verdict on why it ended
                    limit = getattr(process, "limit_hit", None)
                    if sandbox.stopped:
                        raise FailedPrecondition(
                            f"{inv.session} was stopped while this invocation was running",
                            reason="SESSION_STOPPED") from None
                    if limit == "memory":
                        raise ResourceExhausted(
                            f"{inv.session}: the agent went over its memory limit (resources.memory_mb="
                            f"{manifest.memory_mb}) and was stopped", reason="MEMORY_LIMIT") from None
                    if limit == "cpu":
                        raise ResourceExhausted(
                            f"{inv.session}: the agent used up its CPU time (resources.cpu_seconds="
                            f"{manifest.cpu_seconds}) and was stopped", reason="CPU_LIMIT") from None
                    raise Internal(f"{inv.session}: the sandbox crashed: {exc}", reason="SANDBOX_CRASHED") from None
                except BaseException:
                    # Cancelled mid-stream (the caller went away): the worker may still be busy
                    # with this turn, so it cannot serve the next one.
                    await self._drop(inv.session)
                    raise
                assert done is not None
                self.spans.forward(done.otlp_spans, {k: str(attributes[k]) for k in TRUSTED_SPAN_KEYS})
                try:
                    committed = await self.sessions.commit(
                        caller, inv.session, sandbox.lease_id, sandbox.etag, done.state,
                        inv.invocation_id, inv.payload, b"".join(output),
                    )
                except BaseException:
                    await self._drop(inv.session)
                    raise
                sandbox.state, sandbox.etag = done.state, committed.etag
                sandbox.last_used = time.monotonic()
                span.set_attribute("corral.turn", committed.turn_count)
                span.set_status(trace.StatusCode.OK)
                yield Completed(int((time.monotonic() - started) * 1000), committed.turn_count)
            except BaseException as exc:
                if not isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
                    span.set_status(trace.StatusCode.ERROR, str(exc)[:500])
                    span.set_attribute("error.type", getattr(exc, "reason", type(exc).__name__))
                raise
        finally:
            span.end()
            if credential is not None:
                # The invocation is over: its token must not work a moment longer.
                self._revoke(credential)

    def _mint(
        self, caller: Caller, inv: Invocation, manifest: Manifest, deadline: float
    ) -> Credential | None:
        """The invocation's credential: its audience is the tools the manifest declares, so a
        version without tools gets none."""
        if self.credentials is None or not manifest.tools:
            return None
        return self.credentials.mint(
            version=inv.version, session=inv.session, invocation_id=inv.invocation_id,
            tenant=caller.tenant, user=caller.user, audience=[t.name for t in manifest.tools],
            expires_at=min(deadline, time.time() + self.credentials.keyring.retain_s * 0.9),
        )

    def _revoke(self, credential: Credential) -> None:
        """Revokes in the background: the caller already has its answer, and a cancelled
        invocation must still revoke."""
        assert self.credentials is not None
        task = asyncio.get_running_loop().create_task(self.credentials.revoke(credential))
        self._revocations.add(task)
        task.add_done_callback(self._revocation_done)

    def _revocation_done(self, task: asyncio.Task[None]) -> None:
        self._revocations.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not revoke an invocation credential (it expires at its "
                        "deadline): %s", task.exception())

    def _validate(self, inv: Invocation) -> None:
        for field, value, parse in (
            ("session", inv.session, names.parse_session),
            ("version", inv.version, names.parse_version),
        ):
            try:
                parse(value)
            except names.ResourceNameError as exc:
                raise InvalidArgument.field(field, str(exc)) from None
        if not inv.digest.startswith("sha256:"):
            raise InvalidArgument.field("digest", "must be the version's sha256:... digest")
        if len(inv.payload) > self.settings.max_payload_bytes:
            raise InvalidArgument.field(
                "payload", f"{len(inv.payload)} bytes is over the {self.settings.max_payload_bytes}-byte limit"
            )

    # -- sandboxes -----------------------------------------------------------------------

    async def _sandbox_for(self, caller: Caller, inv: Invocation) -> Sandbox:
        current = self.sandboxes.get(inv.session)
        if current is not None and current.alive and current.spec.version == inv.version:
            if self._owners.get(inv.session) != caller:
                raise PermissionDenied(f"{inv.session} belongs to another caller")
            return current
        if current is not None:
            await self._drop(inv.session)
        await self._make_room()
        lease = await self.sessions.acquire(caller, inv.session, self.holder, self.settings.lease_ttl_s)
        try:
            sandbox = self.pools.take(inv.version, inv.digest) if self.pools else None
            warm = sandbox is not None
            if sandbox is None:
                sandbox = await self.new_sandbox(inv.version, inv.digest)
        except BaseException:
            await self._release(caller, inv.session, lease.lease_id)
            raise
        sandbox.bind(inv.session, warm=warm)
        sandbox.lease_id = lease.lease_id
        sandbox.state = lease.state.state
        sandbox.etag = lease.state.etag
        self.sandboxes[inv.session] = sandbox
        self._owners[inv.session] = caller
        self.metrics.live.set(len(self.sandboxes))
        log.info("sandbox pid %s (%s) serves %s on %s", sandbox.process.pid if sandbox.process else "?",
                 "warm" if sandbox.warm else "cold start", inv.session, inv.version)
        return sandbox

    async def new_sandbox(self, version: str, digest: str) -> Sandbox:
        """A started sandbox of `version` with its bundle imported, bound to no session yet: for
        a warm pool, or for a session that found none."""
        bundle = await self.bundles.ensure(version, digest)
        manifest = self._manifest(digest, bundle)
        ref = names.parse_version(version)
        spec = SandboxSpec(
            session=f"(warm) {version}", version=version, bundle_dir=bundle,
            workdir=self.workdirs / uuid.uuid4().hex, entrypoint=manifest.entrypoint,
            prompt_file=manifest.prompt_file, python=self.settings.python,
            # Per version only: the session, endpoint and tenant of each invocation are set on
            # the agent's spans by the worker, and enforced by the executor when it forwards them.
            resource={
                "service.name": f"agent-{ref.agent}",
                "corral.agent": names.agent_name(ref.agent),
                "corral.version": version,
            },
            memory_mb=manifest.memory_mb, cpu_seconds=manifest.cpu_seconds,
            protocol=manifest.protocol,
        )
        sandbox = Sandbox(spec)
        began = time.monotonic()
        try:
            await sandbox.start(self.driver)
        except AgentFailed as exc:
            raise AgentError(
                f"the agent failed to load: {exc.error_type}: {exc.message}", reason="AGENT_LOAD_ERROR",
            ) from None
        self.metrics.sandbox_start.labels(self.driver.name).observe(time.monotonic() - began)
        return sandbox

    def _manifest(self, digest: str, bundle: Path) -> Manifest:
        manifest = self._manifests.get(digest)
        if manifest is None:
            manifest = parse_manifest((bundle / "agent.toml").read_text())
            self._manifests[digest] = manifest
        return manifest

    async def _make_room(self) -> None:
        while len(self.sandboxes) >= self.settings.max_live_sandboxes:
            idle = [(sb.last_used, s) for s, sb in self.sandboxes.items() if s not in self._busy]
            if not idle:
                return
            _, oldest = min(idle)
            await self._drop(oldest)

    async def _release(self, caller: Caller, session: str, lease_id: str) -> None:
        try:
            await self.sessions.release(caller, session, lease_id)
        except Exception as exc:  # noqa: BLE001 - the lease expires by itself
            log.warning("could not release the lease of %s: %s", session, exc)

    async def _drop(self, session: str) -> bool:
        sandbox = self.sandboxes.pop(session, None)
        caller = self._owners.pop(session, None)
        if sandbox is None:
            return False
        self.metrics.live.set(len(self.sandboxes))
        await sandbox.stop()
        if caller is not None and sandbox.lease_id:
            await self._release(caller, session, sandbox.lease_id)
        return True

    async def stop_session(self, session: str) -> bool:
        sandbox = self.sandboxes.get(session)
        if sandbox is not None:
            # An invocation still streaming sees its worker go away: it should say why.
            sandbox.stopped = True
        return await self._drop(session)

    def list_sandboxes(self) -> list[tuple[Sandbox, str]]:
        """Every sandbox with its state: WARM (in a pool), IDLE or BUSY (a session's)."""
        out = [(sb, "BUSY" if s in self._busy else "IDLE") for s, sb in self.sandboxes.items()]
        if self.pools is not None:
            out += [(sb, "WARM") for pool in self.pools.ready().values() for sb in pool]
        return out

    # -- background: idle timeouts, lifetimes, lease renewal -----------------------------

    async def _reap_forever(self) -> None:
        last_renew = time.monotonic()
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            try:
                now = time.monotonic()
                for session, sb in list(self.sandboxes.items()):
                    if session in self._busy:
                        continue
                    manifest = self._manifests.get(_digest_of(sb))
                    idle_limit = manifest.idle_timeout_s if manifest else 900
                    life_limit = manifest.max_lifetime_s if manifest else 28_800
                    expired = not sb.alive or time.time() - sb.bound_at > life_limit
                    if not expired and now - sb.last_used > idle_limit and await self._busy_inside(sb):
                        sb.last_used = now  # AgentCore's contract: a HealthyBusy agent is not idle
                        continue
                    if session in self._busy or self.sandboxes.get(session) is not sb:
                        continue  # an invocation arrived while the agent was asked
                    if expired or now - sb.last_used > idle_limit:
                        log.info("stopping sandbox of %s (idle, expired or exited)", session)
                        await self._drop(session)
                if now - last_renew >= self.settings.lease_ttl_s / 3:
                    last_renew = now
                    await self._renew_leases()
            except Exception:
                log.exception("sandbox reaper failed; retrying")

    async def _busy_inside(self, sandbox: Sandbox) -> bool:
        """Whether an http-protocol agent reports background work on its /ping."""
        return sandbox.spec.protocol == "http" and await sandbox.ping() == "HealthyBusy"

    async def _renew_leases(self) -> None:
        for session, sb in list(self.sandboxes.items()):
            caller = self._owners.get(session)
            if caller is None or not sb.lease_id:
                continue
            try:
                await self.sessions.renew(caller, session, sb.lease_id, self.settings.lease_ttl_s)
            except Exception as exc:  # noqa: BLE001
                log.warning("lost the lease of %s (%s); stopping its sandbox", session, exc)
                if session not in self._busy:
                    await self._drop(session)


def _digest_of(sandbox: Sandbox) -> str:
    return "sha256:" + sandbox.spec.bundle_dir.name.split("-", 1)[-1]


def _busy(session: str) -> Aborted:
    return Aborted(
        f"session {session} is busy: another invocation is running on it; retry when it finishes",
        reason="SESSION_BUSY",
    )


def default_holder(listen: str) -> str:
    return f"executor@{socket.gethostname()}/{listen}#{os.getpid()}"
