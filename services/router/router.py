"""The router's domain: which version serves a session (its pin, or for a new session the
endpoint's split), and forwarding each invocation to an executor. No gRPC here: the services it
calls are the Protocols of model.py, and their failures arrive as the domain error tree."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing

from corral.names import EndpointRef, SessionRef
from services.common import tenancy
from services.common.clock import IdSource, RandomIds
from services.common.endpoints import EndpointMirror, EndpointTraffic
from services.common.errors import (
    CorralError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.common.fleet import FleetMember
from services.common.identity import Caller
from services.common.requests import session_for_request
from services.common.tenancy import Access
from services.router.model import (
    REASON_EXECUTOR_AT_CAPACITY,
    REASON_EXECUTOR_UNAVAILABLE,
    ExecutionEvent,
    ExecutorClient,
    Invocation,
    RegistryClient,
    Resolved,
    SessionPin,
    SessionsClient,
    Target,
    TraceContext,
)
from services.router.pins import PinCache
from services.router.placing import REASON_NO_EXECUTORS, Placement
from services.router.routing import bucket, choose

log = logging.getLogger(__name__)
DEFAULT_CONTENT_TYPE = "application/json"
MAX_CONTENT_TYPE_CHARS = 255
# The executor's reasons for a version that could not start at all: a session created for the
# turn that met one of them has nothing in it and is deleted rather than left ACTIVE.
START_FAILURES = frozenset({
    "AGENT_LOAD_ERROR",
    "SANDBOX_START_FAILED",
    "SANDBOX_START_TIMEOUT",
    "SANDBOX_PROTOCOL",
    "DIGEST_MISMATCH",
})
# The lease of a session is still held by the executor it was on before it moved (this router's
# pin is older than the session's placement), or its executor cannot be reached: a turn that
# has not started is sent again, once, where the session is now or elsewhere.
HELD_ELSEWHERE = "SESSION_HELD_ELSEWHERE"
RETRIED_ELSEWHERE = frozenset({HELD_ELSEWHERE, REASON_EXECUTOR_UNAVAILABLE, REASON_EXECUTOR_AT_CAPACITY})
# Executors passed over for the turn's second attempt: it could not be reached, or it has no
# sandbox to spare and another may.
AVOIDED = frozenset({REASON_EXECUTOR_UNAVAILABLE, REASON_EXECUTOR_AT_CAPACITY})


def check_target(target: Target) -> None:
    if target.version is not None and target.version.parent != target.agent:
        raise InvalidArgument.field(
            "version", f"{target.version.name} is not a version of {target.agent.name}"
        )


class Router:
    def __init__(
        self,
        sessions: SessionsClient,
        registry: RegistryClient,
        executor: ExecutorClient,
        endpoints: EndpointMirror,
        max_payload_bytes: int,
        placement: Placement,
        ids: IdSource | None = None,
    ) -> None:
        self._sessions = sessions
        self._registry = registry
        self._executor = executor
        self.placement = placement
        self.endpoints = endpoints
        self.pins = PinCache()
        self.max_payload_bytes = max_payload_bytes
        self._ids = ids or RandomIds()

    async def resolve(self, caller: Caller, target: Target, request_id: str = "") -> Resolved:
        """The session the invocation runs in and its version: the session's pin when it has
        one, else a new session pinned to the named version or to what the endpoint chooses.

        Session ids are per tenant: a caller naming a session of another tenant's finds nothing
        there (its own tenant has no such session), so it gets a new session of its own under
        that id. In the caller's tenant, continuing another user's session takes the rights
        sessions ask for changing it (services/common/tenancy.py): PERMISSION_DENIED without.

        A new session for a request with a request id is named after it, so that the request's
        retry finds the session its first attempt created (and in it, the committed turn)."""
        check_target(target)
        session = target.session or self._new_session(caller, request_id)
        # A session the caller named, or a retried request's, may exist already.
        known = target.session is not None or bool(request_id)
        pin = self.pins.get(caller.tenant, session) if known else None
        if pin is not None and self._maybe_retired(pin):
            # Its version no longer takes new sessions here: a rollback may have migrated or
            # stopped it, so read the session again rather than trust the cached pin.
            pin = await self._sessions.get(caller, session)
        if pin is None:
            # Not pinned here: most often a new session, so it is created straight away; one that
            # exists already (started through another router) is refused by the create and read.
            # That saves a new session a round trip to sessions.
            try:
                created = await self._create(caller, session, target)
            except CorralError:
                # Nothing to create it from (an endpoint or version that is not there): a session
                # that exists needs neither, so its pin decides.
                if not known or (pin := await self._sessions.get(caller, session)) is None:
                    raise
            else:
                if created is not None:
                    return created
                pin = await self._sessions.get(caller, session)
                if pin is None:
                    raise FailedPrecondition(
                        f"{session.name} vanished while it was being created; retry"
                    )
        tenancy.check_session(caller, pin.owner, Access.WRITE, session.name)
        if pin.agent != target.agent:
            raise FailedPrecondition(
                f"{session.name} belongs to {pin.agent.name}, not {target.agent.name}; "
                "use another session id",
                reason="SESSION_AGENT_MISMATCH",
            )
        if pin.ended is not None:
            self.pins.forget(caller.tenant, session)
            raise FailedPrecondition(
                f"{session.name} is {pin.ended.value}; start a new session",
                reason="SESSION_ENDED",
            )
        self.pins.put(pin)
        return Resolved(pin, new_session=False)

    def _new_session(self, caller: Caller, request_id: str) -> SessionRef:
        if request_id:
            return SessionRef(session_for_request(caller.tenant, request_id))
        return SessionRef(self._ids.new_id())

    async def _create(self, caller: Caller, session: SessionRef, target: Target) -> Resolved | None:
        """Creates the session, pinned to the target's version or to what its endpoint chooses
        for it; None when a session with that id exists already."""
        endpoint: EndpointRef | None = None
        if target.version is not None:
            version = target.version
        else:
            endpoint = target.routing_endpoint()
            view = await self.endpoints.get(caller.tenant, endpoint)
            version = target.agent.version(choose(view.shares, bucket(view.salt, session.session)))
        info = await self._registry.version(caller.tenant, version)
        if not info.ready:
            raise FailedPrecondition(
                f"{version.name} did not start when it was published (or is still being "
                f"started), so it takes no sessions; `corral versions {version.agent}` shows why",
                reason="VERSION_NOT_READY",
            )
        # Placed before it exists: the placement is recorded with the session.
        executor = await self.placement.for_new(session.session, version.name)
        created = await self._sessions.create(caller, session, info, endpoint, executor.name)
        if created is None:
            return None
        self.pins.put(created)
        return Resolved(created, new_session=True)

    def _maybe_retired(self, pin: SessionPin) -> bool:
        if pin.endpoint is None:
            return False
        view = self.endpoints.cached(pin.owner.tenant, pin.endpoint)
        return view is not None and not view.routes_to(pin.version.number)

    def cached_endpoint(
        self, tenant: str, endpoint: EndpointRef
    ) -> tuple[EndpointTraffic | None, bool]:
        """The tenant's endpoint as this router's mirror holds it, and whether the mirror is in
        sync."""
        return self.endpoints.cached(tenant, endpoint), self.endpoints.synced.is_set()

    def check_payload(self, payload: bytes) -> None:
        if not payload:
            raise InvalidArgument.field("payload", "is empty; send a request body such as {}")
        if len(payload) > self.max_payload_bytes:
            raise InvalidArgument.field(
                "payload", f"{len(payload)} bytes is over the {self.max_payload_bytes}-byte limit"
            )

    async def invoke(
        self,
        caller: Caller,
        target: Target,
        payload: bytes,
        content_type: str,
        trace: TraceContext,
        request_id: str = "",
    ) -> AsyncGenerator[tuple[Invocation, ExecutionEvent], None]:
        """Runs one turn: resolves its session, then streams the execution's events, each with
        the invocation it belongs to. With a request id, a turn it already committed is not run
        again: the executor sends its recorded result (Started.replayed)."""
        self.check_payload(payload)
        if len(content_type) > MAX_CONTENT_TYPE_CHARS:
            raise InvalidArgument.field(
                "content_type", f"{len(content_type)} characters is over the limit of "
                f"{MAX_CONTENT_TYPE_CHARS}; send a media type such as application/json",
            )
        resolved = await self.resolve(caller, target, request_id)
        invocation_id = self._ids.new_id()
        avoid = ""
        passed_over: CorralError | None = None
        for attempt in range(2):
            try:
                pin, executor = await self.placement.executor_for(resolved.pin, avoid)
            except Unavailable as none_other:
                # No other executor to go to: the first one's refusal is the caller's answer.
                if passed_over is not None and none_other.reason == REASON_NO_EXECUTORS:
                    raise passed_over from None
                raise
            if pin != resolved.pin:
                self.pins.put(pin)
                resolved = Resolved(pin, resolved.new_session)
            invocation = Invocation(
                resolved, invocation_id, payload, content_type or DEFAULT_CONTENT_TYPE, request_id
            )
            started = False
            try:
                async with aclosing(self._execute(caller, invocation, trace, executor)) as events:
                    async for event in events:
                        started = True
                        yield invocation, event
                return
            except CorralError as exc:
                # Nothing ran yet, so the turn can go elsewhere once: to where the session is
                # now (its lease is still with the executor it left), or away from an executor
                # that cannot be reached though the fleet still lists it (killed, not yet out)
                # or that has no sandbox to spare.
                if started or attempt or exc.reason not in RETRIED_ELSEWHERE:
                    raise
                if exc.reason in AVOIDED:
                    avoid, passed_over = executor.name, exc
                    continue
                fresh = await self._sessions.get(caller, resolved.pin.session)
                if fresh is None:
                    raise
                self.pins.put(fresh)
                resolved = Resolved(fresh, resolved.new_session)

    async def _execute(
        self, caller: Caller, invocation: Invocation, trace: TraceContext, executor: FleetMember
    ) -> AsyncGenerator[ExecutionEvent, None]:
        resolved = invocation.resolved
        # Closing this generator (the caller went away) closes the execution's, which ends the
        # execution too, rather than letting it run on and commit its turn.
        try:
            async with aclosing(
                self._executor.execute(caller, invocation, trace, executor)
            ) as events:
                async for event in events:
                    yield event
        except CorralError as exc:
            if resolved.new_session and exc.reason in START_FAILURES:
                await self._abandon(caller, resolved.pin.session)
            elif isinstance(exc, NotFound):
                # The session was deleted since its pin was cached here: the next turn under
                # its id starts a new session rather than meet the old pin again.
                self.pins.forget(caller.tenant, resolved.pin.session)
            raise

    async def _abandon(self, caller: Caller, session: SessionRef) -> None:
        """Deletes a session created for a turn whose version could not start. The turn's own
        error is what the caller needs, so a failure here is only logged."""
        self.pins.forget(caller.tenant, session)
        try:
            await self._sessions.delete(caller, session)
        except CorralError as exc:
            log.warning("could not delete %s after its version failed to start: %s", session.name, exc)

    async def stop_session(self, caller: Caller, session: SessionRef) -> None:
        await self._sessions.stop(caller, session)
        pin = self.pins.get(caller.tenant, session) or await self._sessions.get(caller, session)
        executor = self.placement.fleet.get(pin.executor) if pin is not None and pin.executor else None
        if executor is not None:
            await self._executor.stop_session(caller, session, executor)
        self.pins.forget(caller.tenant, session)
