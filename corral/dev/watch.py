"""Noticing that an agent's directory changed, by polling: each file's size and modification
time, with the folders a bundle leaves out (and deps/, which publish generates) ignored, and a
burst of saves taken as one change once the directory has been quiet for a poll."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from corral.bundle import DEPS_DIR, SKIPPED_DIRS, SKIPPED_SUFFIXES

# Generated or tools' folders whose churn is never a change to the agent. deps/ is ignored at
# the top only, where publish installs declared dependencies; elsewhere it may be the agent's code.
IGNORED_DIRS = SKIPPED_DIRS | {".ruff_cache", "node_modules", ".tox", ".idea", ".vscode"}
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class FileStamp:
    """What a save changes: touching a file changes its mtime, which is enough to look again."""

    size: int
    mtime_ns: int


Snapshot = Mapping[str, FileStamp]
Sleep = Callable[[float], Awaitable[None]]


def _ignored_dir(relative_parent: str, name: str) -> bool:
    return name in IGNORED_DIRS or name.endswith(".egg-info") or (
        relative_parent == "." and name == DEPS_DIR)


def scan(root: Path) -> dict[str, FileStamp]:
    """Every watched file under `root`, by its path relative to `root` (with / separators)."""
    stamps: dict[str, FileStamp] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        parent = Path(dirpath).relative_to(root).as_posix()
        dirnames[:] = [d for d in dirnames if not _ignored_dir(parent, d)]
        for name in filenames:
            if name.endswith(SKIPPED_SUFFIXES):
                continue
            path = Path(dirpath, name)
            try:
                st = path.stat()
            except OSError:  # removed between the listing and the stat: the next poll says so
                continue
            stamps[path.relative_to(root).as_posix()] = FileStamp(st.st_size, st.st_mtime_ns)
    return stamps


def changed_paths(before: Snapshot, after: Snapshot) -> tuple[str, ...]:
    """The files added, removed or changed between two snapshots, sorted."""
    return tuple(sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p)))


async def changes(
    root: Path, since: Snapshot, *, interval: float = POLL_SECONDS, sleep: Sleep = asyncio.sleep
) -> AsyncIterator[tuple[str, ...]]:
    """Yields the paths changed since the last yield (or `since`), each time the directory has
    changed and then stayed the same for one more poll: an editor's burst of writes, or a
    `git checkout`, is one change."""
    seen = since
    while True:
        await sleep(interval)
        now = scan(root)
        if now == seen:
            continue
        while True:
            await sleep(interval)
            later = scan(root)
            if later == now:
                break
            now = later
        paths = changed_paths(seen, now)
        seen = now
        yield paths
