"""Values and seams of deleting and retention: what keeps a version, the versions retention
looks at, the store's deleting side and the sessions service's count of pinned sessions."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from corral.names import AgentRef, EndpointRef, VersionRef
from services.registry.model import RegistryTx, VersionRecord
from services.registry.rollout_model import RunRecord


@dataclass(frozen=True)
class VersionSessions:
    """The sessions of a version's tenant pinned to it."""

    active: int
    last_active_time: datetime | None


@dataclass(frozen=True)
class RetentionCandidate:
    """A version that is not its agent's newest and has not been used (published, routed to)
    since `last_used`."""

    version: VersionRecord
    last_used: datetime


@dataclass(frozen=True)
class Blockers:
    """What keeps versions from being deleted: endpoints (with why), running rollouts and
    experiments, and active sessions pinned to them."""

    endpoints: tuple[str, ...] = ()
    runs: tuple[str, ...] = ()
    sessions: int = 0

    def __bool__(self) -> bool:
        return bool(self.endpoints or self.runs or self.sessions)


class LifecycleTx(RegistryTx, Protocol):
    """A registry transaction that also deletes."""

    async def agent_runs(self, tenant: str, agent: AgentRef) -> list[RunRecord]:
        """The rollouts and experiments running on the agent's endpoints."""
        ...

    async def version_numbers(self, tenant: str, agent: AgentRef) -> list[int]:
        """The numbers of the agent's versions, in order."""
        ...

    async def delete_versions(
        self, tenant: str, agent: AgentRef, numbers: Collection[int]
    ) -> list[str]:
        """Deletes the versions (and their stable history); returns their digests. Their numbers
        are never given again."""
        ...

    async def collect_bundles(self, digests: Collection[str]) -> list[str]:
        """Deletes those of the bundles that no version of any tenant has; returns them, and
        tells every replica's watchers when the transaction commits."""
        ...

    async def delete_endpoint(self, tenant: str, endpoint: EndpointRef, revision: int) -> None:
        """Deletes the endpoint with its history (stable versions, runs); watchers hear of it."""
        ...

    async def delete_agent(self, tenant: str, agent: AgentRef) -> None:
        """Deletes the agent's row (its versions and endpoints must be gone)."""
        ...


class LifecycleStore(Protocol):
    def tx(self) -> AbstractAsyncContextManager[LifecycleTx]: ...

    async def retention_candidates(self, unused_since: datetime) -> list[RetentionCandidate]:
        """Every tenant's versions unused since before `unused_since`, but no agent's newest, by
        tenant, agent and number."""
        ...


class PinnedSessions(Protocol):
    """The sessions service, asked which sessions are pinned to versions."""

    async def pinned_sessions(
        self, tenant: str, versions: Sequence[VersionRef]
    ) -> Mapping[VersionRef, VersionSessions]:
        """The tenant's sessions on each version that has any."""
        ...
