"""What an agent prints, writes to stderr and logs during an invocation, captured inside the
sandbox as log records for the executor (corral.sandbox.v1 Logs frames), bounded per invocation.
Outside an invocation (while the bundle imports, between invocations) output goes where it always
went: the sandbox's own stdout and stderr, which the executor's log keeps."""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from corral.sandbox.v1 import sandbox_pb2 as pb

# Bytes of one invocation's output sent to the executor (each line with its newline); what is past
# it is only counted.
MAX_INVOCATION_BYTES = 64 * 1024
# How long output may wait in the worker before it is sent, while the agent keeps writing.
FLUSH_EVERY_S = 0.5
# A line longer than this is sent in pieces (a print without a newline must not wait forever).
MAX_LINE_CHARS = 8 * 1024

STDOUT, STDERR = "stdout", "stderr"
# OpenTelemetry severity numbers (logs data model): INFO, WARN, and Python's levels.
_SEVERITY = {STDOUT: (9, "INFO"), STDERR: (13, "WARN")}
_LEVELS = ((logging.CRITICAL, 21, "FATAL"), (logging.ERROR, 17, "ERROR"),
           (logging.WARNING, 13, "WARN"), (logging.INFO, 9, "INFO"), (logging.DEBUG, 5, "DEBUG"))


# A line that starts with a logging level, as Python's logging.basicConfig writes it
# ("WARNING:root:..."), uvicorn ("INFO:     ...") and most loggers do: what an HTTP agent's server,
# a subprocess whose logging reaches the sandbox only as text, says of its lines.
_LEVEL_PREFIX = re.compile(r"^(DEBUG|INFO|WARN|WARNING|ERROR|CRITICAL|FATAL)(?=[:\s\]])")
_PREFIX_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING,
                  "WARNING": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL,
                  "FATAL": logging.CRITICAL}


def line_severity(source: str, line: str) -> tuple[int, str]:
    """The severity of a line written to stdout or stderr: the level it starts with, if any,
    else the stream's (INFO for stdout, WARN for stderr)."""
    found = _LEVEL_PREFIX.match(line)
    return severity_of(_PREFIX_LEVELS[found.group(1)]) if found else _SEVERITY[source]


def severity_of(level: int) -> tuple[int, str]:
    """A Python logging level as OpenTelemetry's severity number and text."""
    for floor, number, text in _LEVELS:
        if level >= floor:
            return number, text
    return 1, "TRACE"


class OutputCapture:
    """One invocation's output at a time, as records waiting to be sent (`take`). Threads of the
    agent may write concurrently; `send` (the worker's frame writer) is called with the capture's
    lock held, so records never interleave with another frame."""

    def __init__(self, send: Callable[[pb.Logs], None], lock: threading.RLock) -> None:
        # `lock` is the frame writer's too: records taken are sent before any other frame.
        self._send = send
        self.lock = lock
        self.active = False
        self._records: list[pb.LogRecord] = []
        self._partial: dict[str, str] = {}
        self._size = 0
        self._dropped = 0
        self._flushed = time.monotonic()

    def begin(self) -> None:
        with self.lock:
            self.active, self._size, self._dropped = True, 0, 0
            self._records.clear()
            self._partial.clear()
            self._flushed = time.monotonic()

    def end(self) -> None:
        """Stops capturing; partial lines become records, sent before the next frame."""
        with self.lock:
            for source, text in list(self._partial.items()):
                self._add(source, *line_severity(source, text), text)
            self._partial.clear()
            self.active = False

    def take(self) -> pb.Logs | None:
        """The records waiting to be sent, as one frame (None when there are none)."""
        with self.lock:
            if not self._records and not self._dropped:
                return None
            logs = pb.Logs(records=self._records, dropped_bytes=self._dropped)
            self._records = []
            self._dropped = 0
            self._flushed = time.monotonic()
            return logs

    def write(self, source: str, text: str) -> None:
        """Text written to stdout or stderr: one record per complete line."""
        with self.lock:
            pending = self._partial.pop(source, "") + text
            *lines, rest = pending.split("\n")
            while len(rest) > MAX_LINE_CHARS:
                lines.append(rest[:MAX_LINE_CHARS])
                rest = rest[MAX_LINE_CHARS:]
            if rest:
                self._partial[source] = rest
            for line in lines:
                self._add(source, *line_severity(source, line), line)
            self._maybe_flush()

    def log(self, source: str, level: int, text: str) -> None:
        with self.lock:
            self._add(source, *severity_of(level), text)
            self._maybe_flush()

    def _add(self, source: str, number: int, severity: str, body: str) -> None:
        # A line with its newline: empty lines count too, so their number is bounded as well.
        size = len(body.encode(errors="replace")) + 1
        if self._size + size > MAX_INVOCATION_BYTES:
            self._dropped += size
            return
        self._size += size
        self._records.append(pb.LogRecord(
            time_unix_nano=time.time_ns(), source=source, severity_number=number,
            severity_text=severity, body=body,
        ))

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._flushed >= FLUSH_EVERY_S:
            logs = self.take()
            if logs is not None:
                self._send(logs)


class CapturedStream:
    """sys.stdout or sys.stderr for the agent: captured during an invocation, else the original."""

    def __init__(self, capture: OutputCapture, source: str, original: TextIO) -> None:
        self._capture, self._source, self._original = capture, source, original

    def write(self, text: str) -> int:
        if self._capture.active:
            self._capture.write(self._source, text)
        else:
            self._original.write(text)
        return len(text)

    def flush(self) -> None:
        if not self._capture.active:
            self._original.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._original.fileno()

    @property
    def encoding(self) -> str:
        return self._original.encoding

    def __getattr__(self, name: str) -> object:
        return getattr(self._original, name)


class CaptureHandler(logging.Handler):
    """Python logging during an invocation, as records of the logger's name and level."""

    def __init__(self, capture: OutputCapture) -> None:
        super().__init__()
        self._capture = capture
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if self._capture.active:
                self._capture.log(record.name, record.levelno, text)
            else:
                sys.stderr.write(f"{record.levelname} {record.name}: {text}\n")
        except Exception:  # noqa: BLE001 - logging must never fail the agent
            self.handleError(record)


def install(capture: OutputCapture) -> None:
    """Captures the agent's stdout, stderr and logging through `capture`. The root logger passes
    INFO on unless the agent sets a level of its own (Python's default, WARNING, would drop the
    agent's logging.info)."""
    sys.stdout = CapturedStream(capture, STDOUT, sys.stdout)
    sys.stderr = CapturedStream(capture, STDERR, sys.stderr)
    root = logging.getLogger()
    root.addHandler(CaptureHandler(capture))
    root.setLevel(logging.INFO)
