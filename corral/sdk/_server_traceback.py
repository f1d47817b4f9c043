"""The traceback an http agent's server wrote to its stderr while an invocation failed, cut as
corral/sdk/_runtime.py cuts a corral agent's: only the frames of the bundle's own files (not its
deps/), named relative to it. Servers write it as Python prints it (uvicorn, FastAPI) or inside a
JSON log line's "stackTrace" list (bedrock-agentcore's request log)."""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath

_START = "Traceback (most recent call last):"
_CHAINED = ("The above exception was", "During handling of the above exception")
_FRAME = re.compile(r'^  File "(?P<path>[^"]+)", line (?P<line>\d+), in (?P<name>.*)$')
DEPS = "deps"


def _from_json(line: str) -> str | None:
    """The traceback of a JSON log line carrying one, as Python prints it."""
    if not line.startswith("{"):
        return None
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    stack = entry.get("stackTrace")
    if isinstance(stack, list) and all(isinstance(part, str) for part in stack):
        return "".join(stack)
    return None


def _printed_block(lines: list[str], start: int) -> tuple[str, int]:
    """The traceback printed from lines[start] (its first line), and the index past it: it ends
    with its exception's line, unless a chained exception's traceback follows."""
    index = start + 1
    while index < len(lines):
        line = lines[index]
        index += 1
        if line.startswith(" ") or line == _START or not line or line.startswith(_CHAINED):
            continue
        if index + 1 < len(lines) and not lines[index] and lines[index + 1].startswith(_CHAINED):
            continue
        break
    return "\n".join(lines[start:index]) + "\n", index


def last_traceback(lines: list[str]) -> str | None:
    """The last traceback among the server's stderr lines, as Python prints it."""
    found: str | None = None
    index = 0
    while index < len(lines):
        from_json = _from_json(lines[index])
        if from_json is not None:
            found = from_json
        elif lines[index] == _START:
            found, index = _printed_block(lines, index)
            continue
        index += 1
    return found


def _relative(path: str, bundle: PurePosixPath) -> PurePosixPath | None:
    try:
        relative = PurePosixPath(path).relative_to(bundle)
    except ValueError:
        return None
    return None if relative.parts[:1] == (DEPS,) else relative


def bundle_frames(text: str, bundle: PurePosixPath) -> str:
    """`text` (a printed traceback) with only the frames of the bundle's own files, each with
    its source line; the carets Python 3.11 prints under a line are left out."""
    kept: list[str] = []
    keeping = True
    for line in text.splitlines():
        frame = _FRAME.match(line)
        if frame is not None:
            relative = _relative(frame["path"], bundle)
            keeping = relative is not None
            if keeping:
                kept.append(f'  File "{relative}", line {frame["line"]}, in {frame["name"]}')
        elif line.startswith("    "):
            if keeping and line.strip(" ^~") != "":
                kept.append(line)
        else:
            keeping = True
            kept.append(line)
    return "\n".join(kept) + "\n"


def server_traceback(stderr: list[str], bundle: PurePosixPath) -> str:
    """The failed invocation's traceback from what the server wrote to stderr; "" when it wrote
    none."""
    text = last_traceback(stderr)
    return "" if text is None else bundle_frames(text, bundle)
