"""Where a session runs, as pure rules over the fleet view: rendezvous hashing on the session id
(every router agrees, and a member joining or leaving moves only its share), bounded by load (an
executor far above the fleet's average, or full, is skipped), preferring an executor that has a
warm sandbox for the session's version."""

from __future__ import annotations

from collections.abc import Sequence

from services.common import rendezvous
from services.common.fleet import FleetMember

# An executor with this many times the fleet's average of sandboxes in use takes no new session.
LOAD_BOUND = 1.25


def admissible(members: Sequence[FleetMember]) -> list[FleetMember]:
    """The members that may take a new session: undrained, below the load bound and their
    capacity. When every undrained one is full, all of them (the executor makes room by
    stopping its least recently used idle sandbox)."""
    live = [m for m in members if not m.draining]
    if not live:
        return []
    bound = max(1.0, LOAD_BOUND * sum(m.in_use for m in live) / len(live))
    below = [m for m in live if m.in_use < bound and m.in_use < m.capacity]
    return below or live


def place(session_id: str, version: str, members: Sequence[FleetMember]) -> FleetMember | None:
    """The executor a session goes to; None when no executor may take it."""
    candidates = admissible(members)
    warm = [m for m in candidates if version in m.warm_versions]
    chosen = warm or candidates
    if not chosen:
        return None
    by_name = {m.name: m for m in chosen}
    return by_name[rendezvous.ranking(session_id, by_name)[0]]


def serves(member: FleetMember | None) -> bool:
    """Whether a session's recorded executor still takes its turns: live and undrained."""
    return member is not None and not member.draining
