"""A retried request (AIP-155) whose turn already committed: its recorded result, streamed back as
the first run's was, instead of running the agent again. Asked under the session's lease, so no
other invocation can be committing the same request meanwhile."""

from __future__ import annotations

from collections.abc import Iterator

from services.common.execution import Completed, Started
from services.common.identity import Caller
from services.common.requests import request_digest
from services.executor.model import Event, Invocation, RecordedTurn, Sessions, TurnRequest

# A recorded output (up to 8 MiB) goes back in pieces: one gRPC message holds 4 MiB by default.
REPLAY_CHUNK_BYTES = 256 * 1024
# What a replay's span is named for, so telemetry does not count it as another invocation.
REPLAY_OPERATION = "replay_turn"


def turn_request(inv: Invocation, trace_id: str) -> TurnRequest | None:
    """What the invocation's commit records for a retry; None without a request id."""
    if not inv.request_id:
        return None
    return TurnRequest(
        inv.request_id, request_digest(inv.payload, inv.content_type), inv.content_type, trace_id
    )


async def recorded(sessions: Sessions, caller: Caller, inv: Invocation) -> RecordedTurn | None:
    """The turn the session committed under the invocation's request id, if any."""
    if not inv.request_id:
        return None
    digest = request_digest(inv.payload, inv.content_type)
    return await sessions.lookup(caller, inv.session, inv.request_id, digest)


def events(turn: RecordedTurn, duration_ms: int) -> Iterator[Event]:
    """The recorded turn as an execution's events, marked replayed."""
    yield Started(turn.trace_id, replayed=True, invocation_id=turn.invocation_id)
    for start in range(0, len(turn.output), REPLAY_CHUNK_BYTES):
        yield turn.output[start:start + REPLAY_CHUNK_BYTES]
    yield Completed(duration_ms, turn.turn)
