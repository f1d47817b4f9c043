"""The router's domain values, and the seams it is built on: the sessions, registry and executor
it calls (clients.py implements them over gRPC), and its id source."""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from corral.names import AgentRef, EndpointRef, SessionRef, VersionRef
from services.common.execution import Completed, Started
from services.common.fleet import FleetMember
from services.common.identity import Caller
from services.common.tenancy import SessionOwner

DEFAULT_ENDPOINT = "DEFAULT"
# An executor could not be reached, or went away mid-turn.
REASON_EXECUTOR_UNAVAILABLE = "EXECUTOR_UNAVAILABLE"
# An executor with no sandbox to spare (services/executor/admission.py): another may have one.
REASON_EXECUTOR_AT_CAPACITY = "EXECUTOR_AT_CAPACITY"
# Metadata carrying the caller's trace context (traceparent, tracestate) on to the executor.
TraceContext = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Target:
    """What an invocation names. A version, when given, pins a new session to it whatever the
    endpoint."""

    agent: AgentRef
    endpoint: EndpointRef | None = None
    version: VersionRef | None = None
    # None: start a new session with a generated id.
    session: SessionRef | None = None

    def routing_endpoint(self) -> EndpointRef:
        """The endpoint whose split chooses a new session's version: the named one, else the
        agent's DEFAULT."""
        return self.endpoint or self.agent.endpoint(DEFAULT_ENDPOINT)


@dataclass(frozen=True)
class Resolved:
    """Where one invocation runs: its session, which the router may just have created, and the
    version pinned to it."""

    pin: SessionPin
    new_session: bool


@dataclass(frozen=True)
class Invocation:
    """One turn as the router forwards it to an executor."""

    resolved: Resolved
    invocation_id: str
    payload: bytes
    content_type: str
    # The caller's request id (AIP-155): a retry under it returns the committed turn's result.
    request_id: str = ""


@dataclass(frozen=True)
class Chunk:
    """The next piece of the agent's output."""

    data: bytes


# What an execution reports, in order: Started, any Chunks, Completed.
ExecutionEvent = Started | Chunk | Completed


@dataclass(frozen=True)
class SessionPin:
    """A session as the router sees it: whose it is, whether it has ended, and which version
    serves it."""

    session: SessionRef
    # The session's tenant and the user who started it.
    owner: SessionOwner
    # None while the session takes invocations.
    ended: SessionEnd | None
    agent: AgentRef
    version: VersionRef
    digest: str
    # The endpoint that chose the version; None when the caller named the version.
    endpoint: EndpointRef | None
    # The executor its turns go to (bare name; "" when never placed).
    executor: str = ""


class SessionEnd(enum.Enum):
    """Why a session takes no more invocations."""

    STOPPED = "stopped"
    EXPIRED = "expired"


@dataclass(frozen=True)
class VersionInfo:
    """A published version: its bundle's digest, and the timeouts of the sessions pinned to it
    (its manifest's [lifecycle]; 0 leaves the sessions service's default)."""

    ref: VersionRef
    digest: str
    idle_timeout_s: int = 0
    max_lifetime_s: int = 0
    # Started once at publish (the registry's start check); a version that could not start, or
    # is still being started, takes no sessions.
    ready: bool = True


class SessionsClient(Protocol):
    async def get(self, caller: Caller, session: SessionRef) -> SessionPin | None:
        """The session, or None when there is none by that name."""
        ...

    async def create(
        self, caller: Caller, session: SessionRef, version: VersionInfo,
        endpoint: EndpointRef | None, executor: str,
    ) -> SessionPin | None:
        """Creates the session pinned to `version` with its timeouts, placed on `executor`; None
        when a session by that name exists already (a race, or one this router has not seen)."""
        ...

    async def place(
        self, tenant: str, session: SessionRef, executor: str, expected: str
    ) -> SessionPin:
        """Records `executor` as the session's if it is still `expected` (Aborted,
        PLACEMENT_CONFLICT, when it is not)."""
        ...

    async def stop(self, caller: Caller, session: SessionRef) -> None: ...

    async def delete(self, caller: Caller, session: SessionRef) -> None:
        """Deletes the session (NotFound when there is none)."""
        ...


class RegistryClient(Protocol):
    async def version(self, tenant: str, ref: VersionRef) -> VersionInfo:
        """The tenant's version (names are per tenant)."""
        ...


class ExecutorClient(Protocol):
    """The executors of the fleet, each reached at its address."""

    def execute(
        self, caller: Caller, invocation: Invocation, trace: TraceContext, executor: FleetMember
    ) -> AsyncGenerator[ExecutionEvent, None]:
        """Runs the invocation on `executor`; closing the generator early cancels it. An
        executor that cannot be reached, or dies mid-turn, is Unavailable (EXECUTOR_UNAVAILABLE)."""
        ...

    async def stop_session(self, caller: Caller, session: SessionRef, executor: FleetMember) -> None:
        """Ends the session's sandbox there, and with it any invocation running there."""
        ...


