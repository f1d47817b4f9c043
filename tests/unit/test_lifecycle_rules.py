"""What keeps a version from being deleted, and what retention deletes: the pure rules."""

from __future__ import annotations

from datetime import timedelta

from corral.manifest import Manifest
from corral.names import EndpointRef, VersionRef
from services.common.endpoints import TrafficShare
from services.registry import lifecycle_rules as rules
from services.registry.lifecycle_model import RetentionCandidate, VersionSessions
from services.registry.model import EndpointRecord, VersionRecord
from services.registry.rollout_model import ExperimentRecord, ExperimentSpec, ExperimentState
from tests.fakes.common import T0

PROD = EndpointRef("a", "prod")


def endpoint(traffic: dict[int, int], rollback: int | None = None) -> EndpointRecord:
    return EndpointRecord(
        tenant="t", agent="a", id="prod", follow_latest=False, salt="s", revision=1,
        description="", traffic=tuple(TrafficShare(v, bp) for v, bp in traffic.items()),
        create_time=T0, update_time=T0, rollback_version=rollback,
    )


def experiment(*versions: int) -> ExperimentRecord:
    spec = ExperimentSpec(
        variants=tuple(TrafficShare(v, 10_000 // len(versions)) for v in versions), metrics=(),
        end_time=None, max_sessions=0, alpha=0.05, webhook_url="",
    )
    return ExperimentRecord(
        tenant="t", endpoint=PROD, id=1, spec=spec, state=ExperimentState.RUNNING,
        state_reason="", traffic_start_time=T0, end_time=None, create_time=T0, update_time=T0,
        creator="u", revision=1,
    )


def candidate(number: int) -> RetentionCandidate:
    manifest = Manifest(name="a", entrypoint="agent:app")
    version = VersionRecord("t", "a", number, f"sha256:{number}", 1, manifest, T0, "u")
    return RetentionCandidate(version, T0)


def test_a_refusal_names_endpoints_runs_and_sessions() -> None:
    found = rules.blockers([3], [endpoint({1: 10_000}, rollback=3)], [experiment(1, 3)], sessions=2)
    error = rules.in_use("agents/a/versions/3", found)
    assert error.reason == "VERSION_IN_USE"
    assert error.metadata == {
        "resource": "agents/a/versions/3",
        "endpoints": "agents/a/endpoints/prod (rollback_version)",
        "runs": "agents/a/endpoints/prod/experiments/1",
        "sessions": "2",
    }
    for named in ("agents/a/endpoints/prod (rollback_version)",
                  "agents/a/endpoints/prod/experiments/1", "2 active sessions"):
        assert named in error.message
    # Nothing keeps a version no endpoint, run or session names.
    assert not rules.blockers([2], [endpoint({1: 10_000}, rollback=3)], [experiment(1, 3)])


def test_retention_keeps_what_is_routed_kept_for_rollback_in_a_run_or_lately_in_a_session() -> None:
    cutoff = T0 + timedelta(days=1)
    sessions = {
        VersionRef("a", 4): VersionSessions(0, cutoff + timedelta(seconds=1)),  # active lately
        VersionRef("a", 5): VersionSessions(0, cutoff - timedelta(days=1)),  # long ago
        VersionRef("a", 6): VersionSessions(1, cutoff - timedelta(days=1)),  # still active
    }
    doomed = rules.expired(
        [candidate(n) for n in range(1, 8)], [endpoint({1: 10_000}, rollback=2)],
        [experiment(1, 3)], sessions, cutoff,
    )
    assert [c.version.number for c in doomed] == [5, 7]
    assert rules.unused_since(T0, 0) is None
    assert rules.unused_since(T0, 45) == T0 - timedelta(days=45)
