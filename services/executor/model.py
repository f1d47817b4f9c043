"""The executor's domain values and the seams it is built on: the sessions service (leases, state,
commits), the registry (bundles, versions, endpoints), telemetry (agent spans) and the
credential deny-list. Implementations live in clients.py and store.py; tests use
tests/fakes/executor.py."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from corral.names import SessionRef, VersionRef
from services.common.endpoints import EndpointSource
from services.common.errors import Internal
from services.common.execution import Completed, Started, StartFailure
from services.common.identity import Caller

# Attributes of the executor's own spans (the invocation's, its model and tool calls).
SpanAttributes = Mapping[str, str | int]


class AgentError(Internal):
    """The agent's code raised; the message carries its exception type and message, `stack` its
    traceback (the bundle's frames only)."""

    def __init__(
        self, message: str, *, reason: str, agent_exception: str, agent_message: str, stack: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata, stack=stack)
        self.agent_exception, self.agent_message = agent_exception, agent_message

    def exception_attributes(self) -> dict[str, str]:
        """The agent's exception as OpenTelemetry's `exception` span event names it."""
        return {"exception.type": self.agent_exception, "exception.message": self.agent_message,
                "exception.stacktrace": self.stack}


# -- one invocation ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Invocation:
    """One Execute call, its names already parsed."""

    session: SessionRef
    version: VersionRef
    digest: str
    # The endpoint the version was resolved through, for telemetry ("" when called by version).
    endpoint: str
    invocation_id: str
    payload: bytes
    content_type: str
    # The caller's request id (AIP-155); "" when it gave none.
    request_id: str = ""


# What an execution yields, in order: Started, the agent's output as it comes, Completed.
Event = Started | bytes | Completed


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnInput:
    """What the worker is handed for one invocation."""

    invocation_id: str
    session_id: str
    version: str
    payload: bytes
    content_type: str
    state: bytes
    traceparent: str
    endpoint: str
    tenant: str
    user: str
    # The invocation's credential ("" when its version declares no tools).
    credentials: str
    deadline_unix_ms: int


@dataclass(frozen=True, slots=True)
class TurnOutput:
    """What the worker hands back at the end of a turn: the session's new state and the agent's
    own spans, OTLP-encoded."""

    state: bytes
    otlp_spans: bytes = b""


# -- what the agent printed and logged --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentLogLine:
    """A line the agent wrote to stdout or stderr, or a record it logged, during an invocation."""

    time_unix_nano: int
    # "stdout", "stderr", a Python logger's name; "corral" for the executor's own notes.
    source: str
    # OpenTelemetry's severity number and text.
    severity_number: int
    severity_text: str
    body: str


# What the sandbox hands over as an invocation runs: its log lines, and how many bytes of output
# the worker already left out.
LogSink = Callable[[Sequence[AgentLogLine], int], None]


@dataclass(frozen=True, slots=True)
class LogOrigin:
    """Whose log lines they are: stamped by the executor, whatever the agent's code says."""

    attributes: Mapping[str, str]
    # The invocation's span, in hex ("" when it has none: tracing off).
    trace_id: str
    span_id: str


# -- the agent's calls out of its sandbox ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """A model call the agent made; its answer carries the same call_id."""

    call_id: str
    prompt: str
    system: str = ""
    # Whether the agent reads the answer as it arrives.
    stream: bool = False


@dataclass(frozen=True, slots=True)
class ModelAnswer:
    """The model's answer, or `error` (the agent sees it as its model call failing)."""

    call_id: str
    text: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """A call to one of the tenant's tools, by name; its outcome goes back as a ToolOutcome."""

    call_id: str
    tool: str
    payload: bytes
    content_type: str
    # The agent's own limit for this call (0: none).
    timeout_s: float = 0.0


# What a failed tool call tells the agent (ToolOutcome.error_code).
PERMISSION_DENIED = "PERMISSION_DENIED"
NOT_FOUND = "NOT_FOUND"
TIMEOUT = "TIMEOUT"
UNAVAILABLE = "UNAVAILABLE"
TOOL_ERROR = "TOOL_ERROR"


@dataclass(frozen=True, slots=True)
class Redactions:
    """What was blanked out of a tool's answer (redaction.py): the encodings found ("raw",
    "json", "base64(json)"...) and whose credential it was ("tool_secret", "call_token"). Never
    the value itself."""

    forms: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.forms)

    def __or__(self, other: Redactions) -> Redactions:
        return Redactions(self.forms | other.forms, self.kinds | other.kinds)


class ToolFailure(Exception):
    """A tool call failed in a way the agent is told about; the message never holds a secret."""

    def __init__(self, code: str, message: str, *, redacted: Redactions = Redactions()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # What had to be blanked out of the message, for the span.
        self.redacted = redacted


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """What the agent gets back: the tool's answer, or an error and its code (PERMISSION_DENIED,
    NOT_FOUND, TIMEOUT, UNAVAILABLE, TOOL_ERROR)."""

    payload: bytes = b""
    content_type: str = ""
    error: str = ""
    error_code: str = ""


# Receives each text delta of a streamed answer, in order.
ChunkSink = Callable[[str], Awaitable[None]]
# Answers the agent's model calls; `on_chunk` is given when the agent streams the answer.
ModelHandler = Callable[[ModelRequest, ChunkSink | None], Awaitable[ModelAnswer]]
ToolHandler = Callable[[ToolRequest], Awaitable[ToolOutcome]]


@dataclass(frozen=True, slots=True)
class ResolvedTool:
    tool: str
    kind: str  # "http" or "grpc"
    address: str
    timeout_s: float
    secret: str = field(default="", repr=False)


class ToolResolver(Protocol):
    async def resolve(self, tenant: str, tool: str, timeout_s: float) -> ResolvedTool | None:
        """The tenant's tool with its secret, or None when it has no such tool."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class ToolCall:
    """One call to a resolved tool, as it goes over the wire."""

    tool: ResolvedTool
    # This call's own token: the tool its only audience, dead when the call ends ("" for none).
    token: str = field(repr=False)
    invocation: str
    payload: bytes
    content_type: str
    limit_s: float



class ToolSender(Protocol):
    """Delivers a call to a tenant's tool service (HTTP or gRPC)."""

    async def send(self, call: ToolCall) -> ToolOutcome:
        """The tool's answer; raises ToolFailure when it refuses or cannot be reached, and
        TimeoutError when it does not answer within call.limit_s."""
        ...

    async def close(self) -> None: ...


# -- the sessions service ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionState:
    """A session's committed state: what its next turn starts from."""

    state: bytes
    etag: str
    turn_count: int


@dataclass(frozen=True, slots=True)
class Lease:
    """A session's lease, with the state committed when it was taken."""

    lease_id: str
    committed: SessionState


@dataclass(frozen=True, slots=True, kw_only=True)
class FinishedTurn:
    """What a turn commits: the new state, and the exchange that produced it."""

    invocation_id: str
    input: bytes
    output: bytes
    state: bytes
    # The request id the turn ran under, recorded with its result for a retry (None: none).
    request: TurnRequest | None = None


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """What a turn committed under a request id records for a retry beside its output."""

    request_id: str
    digest: str
    content_type: str
    trace_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedTurn:
    """A turn the session committed under a request id, as its caller received it."""

    turn: int
    output: bytes
    invocation_id: str
    trace_id: str


class Sessions(Protocol):
    """The sessions service: a session's lease, and its state committed turn by turn."""

    async def acquire(self, caller: Caller, session: SessionRef, holder: str, ttl_s: int) -> Lease: ...

    async def renew(self, caller: Caller, session: SessionRef, lease_id: str, ttl_s: int) -> None: ...

    async def release(self, caller: Caller, session: SessionRef, lease_id: str) -> None: ...

    async def commit(
        self, caller: Caller, session: SessionRef, lease_id: str, etag: str, turn: FinishedTurn
    ) -> SessionState:
        """Compare-and-set on `etag`: Aborted when another turn committed since."""
        ...

    async def lookup(
        self, caller: Caller, session: SessionRef, request_id: str, digest: str
    ) -> RecordedTurn | None:
        """The turn the session committed under `request_id`, if any (FailedPrecondition
        REQUEST_ID_REUSED when it had another request digest)."""
        ...


# -- the registry ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartCheckResult:
    """What starting a version once found: `failure` is None when it started."""

    failure: StartFailure | None
    duration_s: float


@dataclass(frozen=True, slots=True)
class PackedBundle:
    """A version's bundle as the registry serves it (a tar, not yet checked or unpacked)."""

    version: VersionRef
    data: bytes


class Registry(Protocol):
    """The registry: versions' bundles and digests, and the endpoints routing to them."""

    async def download(self, version: VersionRef, digest: str) -> PackedBundle:
        """The bundle with `digest`, which `version` has: the executor reads every tenant's
        bundles, by digest (the same bytes, whichever tenant published them)."""
        ...

    async def digest(self, tenant: str, version: VersionRef) -> str:
        """The digest of the tenant's version (names are per tenant)."""
        ...

    def endpoints(self) -> EndpointSource: ...


# -- sandboxes as operators see them -----------------------------------------------------------


class SandboxState(enum.Enum):
    WARM = "WARM"  # started and in a warm pool, no session's yet
    IDLE = "IDLE"  # a session's, between invocations
    BUSY = "BUSY"  # a session's, running an invocation


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxInfo:
    id: str
    session: str  # "" while warm
    version: str
    state: SandboxState
    driver: str
    pid: int
    start_time: datetime
    last_used_time: datetime
    age_s: float
    memory_bytes: int
    cpu_seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolReport:
    version: str
    ready: int
    target: int
    hits: int
    misses: int
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SandboxListing:
    sandboxes: list[SandboxInfo]
    # Only on the first page: the pools are a summary, not the listing's items.
    pools: list[PoolReport]
    next_page_token: str


# -- telemetry and credentials -------------------------------------------------------------------


class LogExport(Protocol):
    def forward(self, lines: Sequence[AgentLogLine], origin: LogOrigin) -> None:
        """Sends one invocation's log lines on in the background, stamped with `origin`."""
        ...


class SpanExport(Protocol):
    def forward(self, encoded: bytes, trusted: Mapping[str, str]) -> None:
        """Sends the agent's OTLP-encoded spans on in the background, with `trusted` (agent,
        version, session, tenant...) stamped over whatever the agent's code put there."""
        ...


@dataclass(frozen=True)
class Credential:
    """A minted invocation token (an EdDSA JWT) and what revoking it takes."""

    token: str = field(repr=False)
    jti: str
    expires_at: float


class CallTokens(Protocol):
    """One invocation's tokens for its tool calls: each call gets its own, with that tool as
    its only audience, and it is revoked the moment the call ends."""

    def mint(self, tool: str, expires_at: float) -> Credential:
        """A token for one call of `tool`, valid until `expires_at` (Unix seconds, rounded up to
        the second) and never past the invocation's deadline."""
        ...

    def revoke(self, credential: Credential) -> None:
        """Revokes in the background: the caller's call is over either way."""
        ...


class RevocationList(Protocol):
    """The jti deny-list of invocation credentials."""

    async def add(self, jti: str, ttl_s: int) -> None: ...

    async def contains(self, jti: str) -> bool:
        """Unavailable when the list cannot be read: a verifier must then fail closed."""
        ...
