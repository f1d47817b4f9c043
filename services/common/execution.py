"""What an execution reports at its ends, as executors produce it and routers pass it on: Started
before the agent's output, Completed once its turn is committed (ExecuteStarted and
ExecuteCompleted of corral.executor.v1)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Started:
    """The executor took the invocation and its sandbox is ready; `trace_id` is the trace the
    invocation's spans go to."""

    trace_id: str


@dataclass(frozen=True, slots=True)
class Completed:
    """The turn is over and its state committed."""

    duration_ms: int
    # The session's turn count after this invocation.
    turn: int
