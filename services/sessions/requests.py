"""Request ids (AIP-155) on the sessions side: the result of each turn committed under one is
recorded with the turn (store.py writes it in the commit's statement), looked up when a request
is retried, and forgotten after the retention time. No gRPC here."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Protocol

from corral.names import SessionRef
from services.common import tenancy
from services.common.clock import Clock, SystemClock
from services.common.errors import FailedPrecondition
from services.common.identity import Caller
from services.common.requests import REASON_REQUEST_ID_REUSED
from services.common.tenancy import Access
from services.sessions.model import SessionKey, SessionStore, TurnResult

log = logging.getLogger(__name__)

# How long a committed turn's result answers a retry, unless CORRAL_REQUEST_RETENTION_S says.
DEFAULT_RETENTION_S = 24 * 3600
# How often results past the retention time are deleted.
SWEEP_EVERY_S = 600.0


class TurnResultStore(Protocol):
    async def get(self, session: SessionKey, request_id: str, since: datetime) -> TurnResult | None:
        """The result recorded for `request_id` in the session, committed at `since` or later."""
        ...

    async def delete_before(self, cutoff: datetime) -> int:
        """Deletes the results committed before `cutoff`; how many there were."""
        ...


def replayable(result: TurnResult, request_digest: str, request_id: str) -> TurnResult:
    """The recorded result, if the retry is the same request; a request id reused for another
    request is refused, never answered with the other's result."""
    if result.digest != request_digest:
        raise FailedPrecondition(
            f"request_id {request_id!r} was already used in this session for another request "
            "(a different payload or content_type); use a new request id for a new request",
            reason=REASON_REQUEST_ID_REUSED,
            metadata={"request_id": request_id},
        )
    return result


class TurnResults:
    """Looks up the turns committed under request ids, and forgets them after `retention_s`."""

    def __init__(
        self, results: TurnResultStore, sessions: SessionStore, retention_s: int,
        clock: Clock | None = None,
    ) -> None:
        self._results, self._sessions = results, sessions
        self.retention = timedelta(seconds=retention_s)
        self._clock = clock or SystemClock()

    async def lookup(
        self, caller: Caller, session: SessionRef, request_id: str, request_digest: str
    ) -> TurnResult | None:
        """The turn the session committed under `request_id`, if one did within the retention
        time. Asked by the executor for the caller, as CommitTurn is: the caller must be allowed
        to continue the session."""
        key = SessionKey(tenancy.acting_tenant(caller), session.session)
        record = await self._sessions.get(key)
        if record is None:
            raise tenancy.not_found(session.name)
        tenancy.check_session(caller, record.owner, Access.WRITE, session.name)
        found = await self._results.get(key, request_id, self._clock.now() - self.retention)
        return replayable(found, request_digest, request_id) if found is not None else None

    async def sweep(self) -> None:
        """Deletes the results past the retention time (a periodic task)."""
        deleted = await self._results.delete_before(self._clock.now() - self.retention)
        if deleted:
            log.info("forgot %d turn results older than %s", deleted, self.retention)
