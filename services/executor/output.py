"""One invocation's output (what the agent printed and logged), as the sandbox hands it over,
bounded here too: the worker's own bound is the agent's process's, so it is not trusted."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

from services.executor.model import AgentLogLine

# Bytes of log lines (each with its newline) kept per invocation; past it lines are dropped and
# one note says how many.
MAX_INVOCATION_LOG_BYTES = 64 * 1024
# The source of the executor's own note that output was left out.
PLATFORM_SOURCE = "corral"
_WARN = (13, "WARN")


class InvocationOutput:
    """Collects an invocation's log lines up to MAX_INVOCATION_LOG_BYTES and counts the rest."""

    def __init__(self, limit: int = MAX_INVOCATION_LOG_BYTES) -> None:
        self._limit = limit
        self._lines: list[AgentLogLine] = []
        self._size = 0
        self.dropped_bytes = 0

    def take(self, lines: Sequence[AgentLogLine], dropped_bytes: int) -> None:
        """A LogSink: lines the sandbox sent, and bytes the worker already left out."""
        self.dropped_bytes += max(0, dropped_bytes)
        for line in lines:
            if line.source == PLATFORM_SOURCE:
                # Only the platform's notes have this source: an agent's logger named so is
                # told apart from them.
                line = replace(line, source=f"agent.{PLATFORM_SOURCE}")
            size = len(line.body.encode(errors="replace")) + 1  # as the worker counts a line
            if self._size + size > self._limit:
                self.dropped_bytes += size
                continue
            self._size += size
            self._lines.append(line)

    def lines(self) -> list[AgentLogLine]:
        """The lines kept, then, when output was left out, a note saying how much."""
        if not self.dropped_bytes:
            return list(self._lines)
        note = AgentLogLine(
            time.time_ns(), PLATFORM_SOURCE, *_WARN,
            f"[output truncated: {self.dropped_bytes} more bytes were dropped; an invocation "
            f"keeps {self._limit // 1024} KiB of output]",
        )
        return [*self._lines, note]
