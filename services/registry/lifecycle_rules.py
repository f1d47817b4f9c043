"""Pure rules of deleting and retention: what keeps a version (the endpoints that route to it or
keep it for rollback, running rollouts and experiments, active sessions), the refusal that names
them, and which unused versions retention deletes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from corral.names import VersionRef
from services.common.errors import FailedPrecondition
from services.registry.lifecycle_model import Blockers, RetentionCandidate, VersionSessions
from services.registry.model import EndpointRecord
from services.registry.rollout_model import RolloutRecord, RunRecord

REASON_VERSION_IN_USE = "VERSION_IN_USE"
REASON_AGENT_HAS_VERSIONS = "AGENT_HAS_VERSIONS"
REASON_ROLLOUT_RUNNING = "ROLLOUT_RUNNING"
# How many names an error message lists before "and N more" (ErrorInfo metadata lists them all).
NAMED_IN_MESSAGE = 4


def run_versions(run: RunRecord) -> set[int]:
    """The versions a running rollout or experiment moves traffic between."""
    if isinstance(run, RolloutRecord):
        return {run.stable_version, run.candidate_version}
    return {variant.version for variant in run.spec.variants}


def endpoint_uses(endpoint: EndpointRecord, numbers: set[int]) -> list[str]:
    """Why `endpoint` keeps any of `numbers`: it routes to one, or keeps one for rollback."""
    uses = []
    if any(s.version in numbers and s.basis_points > 0 for s in endpoint.traffic):
        uses.append(f"{endpoint.ref.name} (traffic)")
    if endpoint.rollback_version in numbers:
        uses.append(f"{endpoint.ref.name} (rollback_version)")
    return uses


def blockers(
    numbers: Iterable[int], endpoints: Iterable[EndpointRecord], runs: Iterable[RunRecord],
    sessions: int = 0,
) -> Blockers:
    """What keeps any of `numbers` (versions of one agent) from being deleted."""
    wanted = set(numbers)
    return Blockers(
        endpoints=tuple(use for e in endpoints for use in endpoint_uses(e, wanted)),
        runs=tuple(r.name for r in runs if run_versions(r) & wanted),
        sessions=sessions,
    )


def _listed(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:NAMED_IN_MESSAGE])
    more = len(names) - NAMED_IN_MESSAGE
    return f"{shown} and {more} more" if more > 0 else shown


def in_use(subject: str, found: Blockers) -> FailedPrecondition:
    """The refusal to delete `subject`, naming what uses it and what to do."""
    parts, todo = [], []
    if found.endpoints:
        parts.append(f"endpoints {_listed(found.endpoints)}")
        todo.append("move the endpoints' traffic")
    if found.runs:
        parts.append(f"running {_listed(found.runs)}")
        todo.append("end the rollouts or experiments")
    if found.sessions:
        parts.append(f"{found.sessions} active sessions pinned to it")
        todo.append("stop the sessions")
    return FailedPrecondition(
        f"{subject} is in use by {'; '.join(parts)}: {', '.join(todo)} first",
        reason=REASON_VERSION_IN_USE,
        metadata={
            "resource": subject,
            "endpoints": ",".join(found.endpoints),
            "runs": ",".join(found.runs),
            "sessions": str(found.sessions),
        },
    )


def has_versions(subject: str, count: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"{subject} has {count} versions; delete them first, or delete with force to delete the "
        "agent with its versions and endpoints",
        reason=REASON_AGENT_HAS_VERSIONS,
        metadata={"agent": subject, "versions": str(count)},
    )


def runs_running(subject: str, runs: Iterable[RunRecord]) -> FailedPrecondition:
    names = tuple(r.name for r in runs)
    return FailedPrecondition(
        f"{_listed(names)} is running on {subject}; abort it (or conclude the experiment) first",
        reason=REASON_ROLLOUT_RUNNING,
        metadata={"runs": ",".join(names)},
    )


def unused_since(now: datetime, retention_days: int) -> datetime | None:
    """The moment before which a version unused is deleted; None when retention is off (0)."""
    if retention_days <= 0:
        return None
    return now - timedelta(days=retention_days)


def expired(
    candidates: Iterable[RetentionCandidate], endpoints: Iterable[EndpointRecord],
    runs: Iterable[RunRecord], sessions: Mapping[VersionRef, VersionSessions], cutoff: datetime,
) -> list[RetentionCandidate]:
    """The candidates (of one agent) retention deletes: no endpoint routes to one or keeps it
    for rollback, no running rollout or experiment uses it, no session pinned to it is active or
    was active since `cutoff`."""
    endpoints, runs = list(endpoints), list(runs)
    out = []
    for candidate in candidates:
        pins = sessions.get(candidate.version.ref, VersionSessions(0, None))
        if blockers([candidate.version.number], endpoints, runs, pins.active):
            continue
        if pins.last_active_time is not None and pins.last_active_time >= cutoff:
            continue
        out.append(candidate)
    return out
