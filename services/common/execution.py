"""What an execution reports at its ends, as executors produce it and routers pass it on: Started
before the agent's output, Completed once its turn is committed (ExecuteStarted and
ExecuteCompleted of corral.executor.v1); and StartFailure, what the start check at publish found
when a version could not start."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Started:
    """The executor took the invocation and its sandbox is ready; `trace_id` is the trace the
    invocation's spans go to."""

    trace_id: str
    # A retried request whose turn had already committed: the output that follows is the
    # recorded one, and trace_id and invocation_id (else the router's) are the first run's.
    replayed: bool = False
    invocation_id: str = ""


@dataclass(frozen=True, slots=True)
class Completed:
    """The turn is over and its state committed."""

    duration_ms: int
    # The session's turn count after this invocation.
    turn: int


# How much of a traceback a start failure keeps (its end: the exception and where it was raised).
MAX_TRACEBACK = 16 * 1024


@dataclass(frozen=True, slots=True)
class StartFailure:
    """Why a version could not start in a sandbox, as the start check at publish found it (the
    executor reports it, the registry keeps it with the version): what its code raised, or what
    the sandbox saw (StartTimeout, MemoryLimit)."""

    error_type: str
    message: str
    traceback: str = ""

    def bounded(self) -> StartFailure:
        """The same failure with its texts cut to what is stored and sent (the ends kept)."""
        return StartFailure(
            self.error_type[:200], self.message[-4096:], self.traceback[-MAX_TRACEBACK:]
        )

    def last_words(self) -> str:
        """The traceback, or the type and message when there is none: what to show."""
        return self.traceback.rstrip() or f"{self.error_type}: {self.message}"
