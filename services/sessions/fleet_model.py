"""The executor fleet's values and the port its membership is stored behind."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from corral.names import SessionRef
from services.common.identity import Caller


@dataclass(frozen=True)
class ExecutorMember:
    """One executor as its last heartbeat described it."""

    name: str  # bare: `executors/{name}` names it
    address: str  # host:port of its internal (mutual TLS) listener
    instance_id: str  # new at every start of its process
    driver: str
    capacity: int  # the most sandboxes it keeps bound to sessions
    in_use: int  # sandboxes bound now
    warm_versions: tuple[str, ...]
    start_time: datetime
    heartbeat_time: datetime
    draining: bool = False

    def drained(self, draining: bool) -> ExecutorMember:
        return replace(self, draining=draining)


class FleetStore(Protocol):
    """Membership expires by itself (a heartbeat's TTL); the drained marks do not."""

    async def beat(self, member: ExecutorMember, ttl_s: float) -> bool:
        """Stores `member` for `ttl_s`; whether it is drained."""
        ...

    async def members(self) -> Sequence[ExecutorMember]:
        """The live executors, with their drained marks."""
        ...

    async def member(self, name: str) -> ExecutorMember | None:
        """The live executor `name`, with its drained mark; None when it is not live."""
        ...

    async def set_drained(self, name: str, drained: bool) -> None: ...

    async def is_drained(self, name: str) -> bool: ...


class SandboxStopAt(Protocol):
    """An executor of the fleet, at its address, ending its sandbox of a session."""

    async def stop_sandbox_at(self, address: str, caller: Caller, session: SessionRef) -> None: ...
