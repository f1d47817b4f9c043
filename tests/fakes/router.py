"""The router's seams in memory: the sessions, registry and executor clients, and the endpoints
an EndpointMirror reads."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator

from corral.names import EndpointRef, SessionRef, VersionRef
from services.common import tenancy
from services.common.endpoints import EndpointTraffic, EndpointUpdate
from services.common.errors import Aborted, CorralError, NotFound, ResourceExhausted, Unavailable
from services.common.fleet import FleetMember, FleetView
from services.common.identity import Caller
from services.common.tenancy import Access, SessionOwner
from services.router import model as router_model


class FakeSessions:
    """The router's SessionsClient over a dict of pins by tenant and session, with the tenancy
    rules sessions applies."""

    def __init__(self) -> None:
        self.pins: dict[tuple[str, SessionRef], router_model.SessionPin] = {}
        # The version each session was created on, with its timeouts.
        self.created_on: dict[SessionRef, router_model.VersionInfo] = {}
        self.gets = 0

    def _owned(
        self, caller: Caller, session: SessionRef, access: Access
    ) -> router_model.SessionPin | None:
        pin = self.pins.get((caller.tenant, session))
        if pin is not None:
            tenancy.check_session(caller, pin.owner, access, session.name)
        return pin

    async def get(self, caller: Caller, session: SessionRef) -> router_model.SessionPin | None:
        self.gets += 1
        return self._owned(caller, session, Access.READ)

    async def create(
        self, caller: Caller, session: SessionRef, version: router_model.VersionInfo,
        endpoint: EndpointRef | None, executor: str,
    ) -> router_model.SessionPin | None:
        if (caller.tenant, session) in self.pins:
            return None
        owner = SessionOwner(caller.tenant, caller.user)
        pin = router_model.SessionPin(
            session, owner, None, version.ref.parent, version.ref, version.digest, endpoint,
            executor,
        )
        self.pins[caller.tenant, session] = pin
        self.created_on[session] = version
        return pin

    async def place(
        self, tenant: str, session: SessionRef, executor: str, expected: str
    ) -> router_model.SessionPin:
        pin = self.pins[tenant, session]
        if pin.executor != expected:
            raise Aborted(
                f"{session.name} is on {pin.executor}", reason="PLACEMENT_CONFLICT",
                metadata={"executor": f"executors/{pin.executor}"},
            )
        moved = self.pins[tenant, session] = dataclasses.replace(pin, executor=executor)
        return moved

    async def stop(self, caller: Caller, session: SessionRef) -> None:
        pin = self._owned(caller, session, Access.WRITE)
        if pin is None:
            raise NotFound(f"{session.name} not found")
        self.pins[caller.tenant, session] = dataclasses.replace(
            pin, ended=router_model.SessionEnd.STOPPED
        )

    async def delete(self, caller: Caller, session: SessionRef) -> None:
        if self._owned(caller, session, Access.WRITE) is None:
            raise NotFound(f"{session.name} not found")
        del self.pins[caller.tenant, session]


class FakeRegistry:
    """The router's RegistryClient over a dict of published versions."""

    def __init__(self, *versions: router_model.VersionInfo) -> None:
        self.versions = {v.ref: v for v in versions}

    async def version(self, tenant: str, ref: VersionRef) -> router_model.VersionInfo:
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
        # The executor each invocation was sent to.
        self.sent_to: list[str] = []
        self.turns: dict[SessionRef, int] = {}
        # Set: every execution fails with it before starting (a version that cannot start).
        self.fails_with: CorralError | None = None
        # Executors that cannot be reached; or that die after Started (mid-turn).
        self.unreachable: set[str] = set()
        self.dies_mid_turn: set[str] = set()
        # Executors with no sandbox to spare (EXECUTOR_AT_CAPACITY).
        self.full: set[str] = set()

    async def execute(
        self, caller: Caller, invocation: router_model.Invocation, trace: router_model.TraceContext,
        executor: FleetMember,
    ) -> AsyncGenerator[router_model.ExecutionEvent, None]:
        self.invocations.append(invocation)
        self.sent_to.append(executor.name)
        session = invocation.resolved.pin.session
        if self.fails_with is not None:
            raise self.fails_with
        gone = Unavailable(f"{executor.name} is gone",
                           reason=router_model.REASON_EXECUTOR_UNAVAILABLE)
        if executor.name in self.unreachable:
            raise gone
        if executor.name in self.full:
            raise ResourceExhausted(f"{executor.name} is full",
                                    reason=router_model.REASON_EXECUTOR_AT_CAPACITY, retry_delay_s=1.0)
        try:
            yield router_model.Started("trace-" + invocation.invocation_id)
            if executor.name in self.dies_mid_turn:
                raise gone
            size = max(1, -(-len(invocation.payload) // self.chunks))
            for start in range(0, len(invocation.payload), size):
                yield router_model.Chunk(invocation.payload[start : start + size])
            self.turns[session] = self.turns.get(session, 0) + 1
            yield router_model.Completed(duration_ms=1, turn=self.turns[session])
        finally:
            self.closed.append(invocation.invocation_id)

    async def stop_session(
        self, caller: Caller, session: SessionRef, executor: FleetMember
    ) -> None:
        self.stopped.append(session)


class FakeFleet:
    """The members a FleetView lists: change `members` and refresh the view."""

    def __init__(self, *names: str) -> None:
        self.members = [member(n) for n in names]

    async def list(self) -> list[FleetMember]:
        return list(self.members)

    def view(self) -> FleetView:
        return FleetView(self.list)


def member(
    name: str, in_use: int = 0, capacity: int = 64, warm: frozenset[str] = frozenset(),
    draining: bool = False,
) -> FleetMember:
    return FleetMember(name, f"{name}.test:1", capacity, in_use, warm, draining)


class FakeEndpoints:
    """The registry's endpoints, as an EndpointMirror reads them: the watch sends one snapshot,
    `get` reads the dict."""

    def __init__(self, *endpoints: EndpointTraffic) -> None:
        self.endpoints = {e.key: e for e in endpoints}

    async def watch(self) -> AsyncIterator[EndpointUpdate]:
        yield EndpointUpdate(tuple(self.endpoints.values()), snapshot=True)

    async def get(self, tenant: str, ref: EndpointRef) -> EndpointTraffic:
        if (tenant, ref) not in self.endpoints:
            raise NotFound(f"{ref.name} does not exist")
        return self.endpoints[(tenant, ref)]
