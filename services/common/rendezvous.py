"""Rendezvous (highest-random-weight) hashing: every party that knows the same members ranks them
the same way for a key, and a member joining or leaving moves only the keys it wins or held. The
router places sessions with it; executors decide with it which versions they keep warm."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(key: str, member: str) -> int:
    digest = hashlib.sha256(f"{key}\x00{member}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def ranking(key: str, members: Iterable[str]) -> list[str]:
    """`members` from the one `key` prefers most to the one it prefers least."""
    return sorted(set(members), key=lambda m: (-weight(key, m), m))


def top(key: str, members: Iterable[str], k: int) -> list[str]:
    """The `k` members `key` prefers most."""
    return ranking(key, members)[: max(0, k)]
