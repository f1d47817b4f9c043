"""The registry's values (agents, versions, endpoints, the audit log) and the seams its domain is
built on: storage, the clock, and the calls out to telemetry and sessions. No gRPC here."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeAlias, TypeVar

from corral.manifest import Manifest
from corral.names import AgentRef, EndpointRef, ExperimentRef, RolloutRef, ToolRef, VersionRef
from services.common.endpoints import EndpointKey, ToolKey, TrafficShare, VersionKey
from services.common.execution import StartFailure
from services.common.identity import Caller
from services.common.paging import Key, KeyPart, Page, PageQuery
from services.registry.rollout_model import (
    Analysis,
    AnalysisConfig,
    ExperimentAnalysis,
    ExperimentRecord,
    ExperimentSpec,
    RolloutRecord,
    RolloutSpec,
    RunRecord,
    TrafficTarget,
)
from services.registry.tool_model import ToolRecord, ToolSpec


@dataclass(frozen=True)
class AgentRecord:
    tenant: str
    id: str
    create_time: datetime
    latest_version: int

    @property
    def ref(self) -> AgentRef:
        return AgentRef(self.id)


class VersionState(enum.StrEnum):
    """Whether a version can serve, as the start check at publish found it."""

    # Stored; an executor has not yet started it once (or none could be reached to).
    CHECKING = "CHECKING"
    READY = "READY"
    # It could not start: kept with its failure, never routed to.
    FAILED = "FAILED"


@dataclass(frozen=True)
class VersionRecord:
    tenant: str
    agent: str
    number: int
    digest: str
    size: int
    manifest: Manifest
    create_time: datetime
    creator: str
    state: VersionState = VersionState.READY
    # Why it could not start: set when FAILED.
    failure: StartFailure | None = None

    @property
    def ref(self) -> VersionRef:
        return VersionRef(self.agent, self.number)


@dataclass(frozen=True)
class EndpointRecord:
    tenant: str
    agent: str
    id: str
    follow_latest: bool
    salt: str
    revision: int
    description: str
    traffic: tuple[TrafficShare, ...]
    create_time: datetime
    update_time: datetime
    # The last version that served the endpoint alone and is not in its traffic now.
    rollback_version: int | None = None

    @property
    def ref(self) -> EndpointRef:
        return EndpointRef(self.agent, self.id)

    @property
    def etag(self) -> str:
        return f'W/"{self.revision}"'


@dataclass(frozen=True)
class WatchEvent:
    """One message of the endpoint watch: every endpoint (snapshot) or those that changed, the
    endpoints and versions deleted, and the digests whose bundles were collected."""

    endpoints: tuple[EndpointRecord, ...] = ()
    snapshot: bool = False
    removed: tuple[EndpointKey, ...] = ()
    removed_versions: tuple[VersionKey, ...] = ()
    removed_bundles: tuple[str, ...] = ()
    changed_tools: tuple[ToolKey, ...] = ()


JsonValue: TypeAlias = (
    str | int | float | bool | None | Sequence["JsonValue"] | Mapping[str, "JsonValue"]
)
# Audit details as written: JSON values, or domain values the store knows how to write (an
# analysis as evidence).
AuditDetails = Mapping[str, object]


@dataclass(frozen=True)
class AuditRecord:
    id: int
    time: datetime
    tenant: str
    user: str
    method: str
    resource: str
    details: Mapping[str, JsonValue]


@dataclass(frozen=True)
class EndpointChange:
    """What an endpoint update sets; None keeps the field as it is."""

    traffic: tuple[TrafficTarget, ...] | None
    description: str | None


@dataclass(frozen=True)
class Paging:
    """The page a caller's List call asks for: a size (0: the default) and the token of the
    previous page."""

    who: Caller
    size: int = 0
    token: str = ""


Row = TypeVar("Row")


async def read_page(
    paging: Paging, method: str, where: object, key_shape: tuple[type[KeyPart], ...],
    rows: Callable[[Key | None, int], Awaitable[list[Row]]], key: Callable[[Row], Key],
) -> Page[Row]:
    """One page of a listing: `rows(after, limit)` reads in the order `key` gives. The token is
    bound to the method, the filter `where` and the caller's tenant, so it cannot be replayed
    elsewhere."""
    query = PageQuery.start(
        method, owner=paging.who.tenant, where=where, page_size=paging.size, token=paging.token,
        key_shape=key_shape,
    )
    return query.page(await rows(query.after, query.fetch_limit), key=key)


# -- seams -------------------------------------------------------------------------------------


class CatalogReads(Protocol):
    """Agents, their versions and the bundles behind them."""

    async def get_agent(self, tenant: str, agent: AgentRef) -> AgentRecord | None: ...

    async def list_agents(self, tenant: str, after: Key | None, limit: int) -> list[AgentRecord]:
        """In id order."""
        ...

    async def get_version(self, tenant: str, version: VersionRef) -> VersionRecord | None:
        """By number, or by digest when the reference carries one."""
        ...

    async def list_versions(
        self, tenant: str, agent: AgentRef, after: Key | None, limit: int
    ) -> list[VersionRecord]:
        """In number order."""
        ...

    async def version_states(
        self, tenant: str, agent: AgentRef, numbers: Collection[int]
    ) -> dict[int, VersionState]:
        """The state of each of `numbers` that exists."""
        ...

    async def version_with_digest(self, version: VersionRef) -> VersionRecord | None:
        """A version of the agent with the reference's digest, in whichever tenant."""
        ...

    async def bundle(self, digest: str) -> bytes | None:
        """Bundles are shared by digest; a version (of one tenant) is the way to one."""
        ...


class EndpointReads(Protocol):
    async def get_endpoint(
        self, tenant: str, endpoint: EndpointRef, *, for_update: bool = False
    ) -> EndpointRecord | None: ...

    async def list_endpoints(
        self, tenant: str, agent: AgentRef | None, after: Key | None, limit: int
    ) -> list[EndpointRecord]:
        """In (agent, id) order; every agent's when `agent` is None."""
        ...

    async def watched_endpoints(
        self, tenant: str | None, agent: AgentRef | None
    ) -> list[EndpointRecord]:
        """Every endpoint of the tenant (of every tenant when None), of `agent` when given."""
        ...

    async def webhook_url(self, tenant: str, endpoint: EndpointRef) -> str: ...

    async def last_stable(self, tenant: str, endpoint: EndpointRef, not_version: int) -> int | None:
        """The newest version that served the endpoint alone, other than `not_version`."""
        ...


class RunReads(Protocol):
    """Rollouts and experiments ("runs": both change one endpoint over time)."""

    async def get_rollout(
        self, tenant: str, rollout: RolloutRef, *, for_update: bool = False
    ) -> RolloutRecord | None:
        """The rollout, or the endpoint's newest when the reference has no id."""
        ...

    async def get_experiment(
        self, tenant: str, experiment: ExperimentRef, *, for_update: bool = False
    ) -> ExperimentRecord | None: ...

    async def list_rollouts(
        self, tenant: str, endpoint: EndpointRef, after: Key | None, limit: int
    ) -> list[RolloutRecord]:
        """Newest first."""
        ...

    async def list_experiments(
        self, tenant: str, endpoint: EndpointRef, after: Key | None, limit: int
    ) -> list[ExperimentRecord]:
        """Newest first."""
        ...

    async def active_runs(self) -> list[RunRecord]:
        """Every run not ended yet, of every tenant, oldest first."""
        ...

    async def recent_runs(self, limit: int = 200) -> list[RunRecord]:
        """The newest run of each kind on each endpoint."""
        ...

    async def due_drains(self) -> list[RolloutRecord]:
        """Ended rollouts whose drained candidate sessions are due to be stopped."""
        ...


class AuditReads(Protocol):
    async def list_audit(
        self, tenant: str, prefix: str, after: Key | None, limit: int
    ) -> list[AuditRecord]:
        """The tenant's events whose resource starts with `prefix` (literally), newest first."""
        ...


class AuditWrites(Protocol):
    async def audit(
        self, who: Caller, method: str, resource: str, details: AuditDetails
    ) -> None:
        """An event in `who`'s tenant, naming `who` as it describes itself."""
        ...

    async def claim_request(self, tenant: str, key: str, resource: str) -> str | None:
        """Records a create's request key in the tenant; returns the resource an earlier request with the same
        key created, if any."""
        ...


class RegistryTx(CatalogReads, EndpointReads, RunReads, AuditWrites, Protocol):
    """Reads and writes inside one transaction. Reads `for_update` lock the row until it ends;
    endpoint changes reach the watchers when it commits."""

    async def ensure_agent(self, tenant: str, agent: AgentRef, creator: str) -> bool:
        """Creates the agent if missing and locks its row; True if it was created."""
        ...

    async def lock_agent(self, tenant: str, agent: AgentRef) -> bool:
        """Locks the agent's row; False when there is no such agent."""
        ...

    async def insert_version(
        self, tenant: str, agent: AgentRef, digest: str, data: bytes, manifest: Manifest,
        creator: str, state: VersionState,
    ) -> VersionRecord:
        """Stores the bundle (once per digest) as the agent's next version."""
        ...

    async def settle_version(
        self, tenant: str, version: VersionRef, state: VersionState, failure: StartFailure | None,
    ) -> VersionRecord:
        """Sets the state (and failure) the start check found for a stored version."""
        ...

    async def put_endpoint(
        self, tenant: str, endpoint: EndpointRef, traffic: tuple[TrafficShare, ...], *,
        follow_latest: bool = False, description: str = "",
    ) -> EndpointRecord:
        """Creates or replaces the endpoint's traffic (a new revision)."""
        ...

    async def insert_rollout(
        self, tenant: str, endpoint: EndpointRef, stable: int, candidate: int, spec: RolloutSpec,
        creator: str,
    ) -> RolloutRecord | None:
        """The new PROGRESSING rollout; None when another run started on the endpoint just now."""
        ...

    async def insert_experiment(
        self, tenant: str, endpoint: EndpointRef, spec: ExperimentSpec, creator: str,
        traffic_start: datetime,
    ) -> ExperimentRecord | None:
        """The new RUNNING experiment, its split in place since `traffic_start`; None when another
        run started on the endpoint just now."""
        ...

    async def active_run(self, tenant: str, endpoint: EndpointRef) -> RunRecord | None:
        """The endpoint's run that has not ended, locked."""
        ...

    async def save_rollout(self, rollout: RolloutRecord) -> RolloutRecord | None:
        """Writes the rollout's progress if the row is still at its revision (a driver that lost
        its lock cannot apply a step twice); None when it is not."""
        ...

    async def save_experiment(self, experiment: ExperimentRecord) -> ExperimentRecord | None:
        """As save_rollout, for an experiment."""
        ...

    async def try_lock_run(self, run: RunRecord) -> bool:
        """A lock held until the transaction ends, if no one else holds it: exactly one replica
        drives a run."""
        ...


class RegistryStore(CatalogReads, EndpointReads, RunReads, AuditReads, Protocol):
    def tx(self) -> AbstractAsyncContextManager[RegistryTx]:
        """A transaction: committed when the block ends, rolled back when it raises."""
        ...

    async def listen_endpoints(
        self,
        on_change: Callable[[str], None],
        on_deletion: Callable[[str], None],
        on_lost: Callable[[], None],
    ) -> EndpointListener:
        """On one connection, from any replica, once committed: calls
        `on_change("tenant/agent/endpoint/revision")` on every endpoint change,
        `on_deletion("version/tenant/agent/number")` for every version deleted and
        `on_deletion("bundle/digest")` for every bundle collected (no version has it any more);
        and `on_lost()` when the connection that carries them closes."""
        ...


class EndpointListener(Protocol):
    """A connection listening for endpoint changes and deletions."""

    async def alive(self) -> bool:
        """Whether the connection still answers (within a couple of seconds)."""
        ...

    async def close(self) -> None:
        """Stops listening and gives the connection back; never raises."""
        ...


class ToolTx(AuditWrites, Protocol):
    async def get_tool(
        self, tenant: str, tool: ToolRef, *, for_update: bool = False
    ) -> ToolRecord | None: ...

    async def insert_tool(
        self, tenant: str, tool: ToolRef, spec: ToolSpec, ciphertext: bytes | None, creator: str
    ) -> ToolRecord | None:
        """The new tool, or None when the tenant already has one by that name."""
        ...

    async def update_tool(
        self, tenant: str, tool: ToolRef, spec: ToolSpec, ciphertext: bytes | None
    ) -> ToolRecord: ...

    async def delete_tool(self, tenant: str, tool: ToolRef) -> None: ...


class ToolStore(Protocol):
    def tx(self) -> AbstractAsyncContextManager[ToolTx]: ...

    async def get_tool(
        self, tenant: str, tool: ToolRef, *, for_update: bool = False
    ) -> ToolRecord | None: ...

    async def list_tools(self, tenant: str, after: Key | None, limit: int) -> list[ToolRecord]:
        """In name order."""
        ...


# -- calls out ---------------------------------------------------------------------------------


class VersionAnalysis(Protocol):
    """Telemetry's comparison of a candidate with the stable version over a window. Calls out
    name the tenant of the endpoint: the registry calls as itself acting in that tenant."""

    async def compare_versions(
        self, tenant: str, endpoint: EndpointRef, baseline: int, candidate: int, config: AnalysisConfig,
        start: datetime, end: datetime,
    ) -> Analysis: ...


class ExperimentAnalyzer(Protocol):
    """Telemetry's per-variant analysis of an experiment over a window."""

    async def analyze_experiment(
        self, tenant: str, endpoint: EndpointRef, spec: ExperimentSpec, start: datetime, end: datetime
    ) -> ExperimentAnalysis: ...


class SessionRetirement(Protocol):
    """The sessions service, moving or stopping the sessions pinned to a version."""

    async def retire_version(
        self, tenant: str, version: VersionRef, endpoint: EndpointRef, migrate_to: VersionRef | None,
        migrate_digest: str,
    ) -> int:
        """Stops the sessions on `version` (or, with `migrate_to`, re-pins them to it); returns
        how many."""
        ...


class VersionStarts(Protocol):
    """An executor, starting a version once before DEFAULT moves to it (the start check)."""

    async def check_start(self, tenant: str, version: VersionRef, digest: str) -> StartFailure | None:
        """Why `version` could not start, or None when it started. Raises Unavailable when no
        executor answers."""
        ...
