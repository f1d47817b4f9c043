"""What a child process writes: passed on to the launcher's own output as it comes, its last
lines kept for the report when the process dies."""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import IO

TAIL_LINES = 20


class OutputTail:
    """Copies `stream` (a child's stdout and stderr) line by line to `sink` on a thread of its own,
    keeping the last `lines` lines."""

    def __init__(self, name: str, stream: IO[bytes], sink: IO[bytes], lines: int = TAIL_LINES) -> None:
        self._tail: deque[str] = deque(maxlen=lines)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._copy, args=(stream, sink), name=f"{name}-output", daemon=True)
        self._thread.start()

    def _copy(self, stream: IO[bytes], sink: IO[bytes]) -> None:
        with stream:
            for line in iter(stream.readline, b""):
                sink.write(line)
                sink.flush()
                with self._lock:
                    self._tail.append(line.decode(errors="replace").rstrip())

    def last_lines(self, wait_s: float = 1.0) -> list[str]:
        """The last lines, once the process's output has ended (or after `wait_s`: a process it
        started may hold the output open)."""
        self._thread.join(wait_s)
        with self._lock:
            return list(self._tail)


def file_tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last `lines` lines of the log file at `path` (none if there is no such file)."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    return text.splitlines()[-lines:]
