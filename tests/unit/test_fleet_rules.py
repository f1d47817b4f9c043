"""The executor fleet's pure rules: where a session goes (rendezvous hashing with bounded load,
warm first), which executors keep a version warm, when a lease passes to another executor, and
an executor's stable name."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from corral.names import AgentRef
from services.common import rendezvous
from services.common.auth.principal import Principal, Role
from services.common.errors import InvalidArgument, PermissionDenied
from services.executor.identity import executor_name
from services.executor.membership import keeps_warm
from services.router import placement
from services.sessions import fleet_rules
from tests.fakes.router import member

V1 = AgentRef("demo").version(1)
SESSIONS = [f"s{i}" for i in range(400)]


def test_every_party_ranks_the_members_alike_and_a_leaving_member_moves_only_its_own() -> None:
    three, two = ["a", "b", "c"], ["a", "b"]
    assert rendezvous.ranking("s1", three) == rendezvous.ranking("s1", list(reversed(three)))
    before = {s: rendezvous.ranking(s, three)[0] for s in SESSIONS}
    after = {s: rendezvous.ranking(s, two)[0] for s in SESSIONS}
    moved = {s for s in SESSIONS if before[s] != after[s]}
    assert moved == {s for s in SESSIONS if before[s] == "c"}
    # Spread: each of three gets a fair share.
    assert min(Counter(before.values()).values()) > len(SESSIONS) / 5


def test_a_new_session_goes_to_its_rendezvous_choice_among_the_undrained() -> None:
    members = [member("a"), member("b"), member("c", draining=True)]
    chosen = Counter(placement.place(s, V1.name, members).name for s in SESSIONS)  # type: ignore[union-attr]
    assert set(chosen) == {"a", "b"}
    assert placement.place("s1", V1.name, [member("c", draining=True)]) is None
    assert placement.place("s1", V1.name, []) is None


def test_a_loaded_or_full_executor_is_skipped_while_another_can_take_the_session() -> None:
    # Average 4: the bound is 5, so "a" with 10 takes nothing new.
    loaded = [member("a", in_use=10), member("b", in_use=1), member("c", in_use=1)]
    assert {placement.place(s, V1.name, loaded).name for s in SESSIONS} == {"b", "c"}  # type: ignore[union-attr]
    full = [member("a", in_use=2, capacity=2), member("b", in_use=2, capacity=8)]
    assert {placement.place(s, V1.name, full).name for s in SESSIONS} == {"b"}  # type: ignore[union-attr]
    # All full: the ranking decides (the executor makes room by evicting an idle sandbox).
    every = [member("a", in_use=2, capacity=2), member("b", in_use=2, capacity=2)]
    assert {placement.place(s, V1.name, every).name for s in SESSIONS} == {"a", "b"}  # type: ignore[union-attr]


def test_an_executor_with_a_warm_sandbox_of_the_version_is_preferred() -> None:
    members = [member("a"), member("b", warm=frozenset({V1.name})), member("c")]
    assert {placement.place(s, V1.name, members).name for s in SESSIONS} == {"b"}  # type: ignore[union-attr]
    other = AgentRef("demo").version(2).name
    assert len({placement.place(s, other, members).name for s in SESSIONS}) == 3  # type: ignore[union-attr]
    # Unless it is drained.
    members[1] = member("b", warm=frozenset({V1.name}), draining=True)
    assert "b" not in {placement.place(s, V1.name, members).name for s in SESSIONS}  # type: ignore[union-attr]


def test_a_recorded_executor_serves_while_live_and_undrained() -> None:
    assert placement.serves(member("a"))
    assert not placement.serves(member("a", draining=True))
    assert not placement.serves(None)


def test_each_version_is_kept_warm_by_k_of_the_live_undrained_executors() -> None:
    names = ["a", "b", "c", "d"]
    members = [member(n) for n in names]
    versions = [AgentRef("demo").version(n) for n in range(1, 60)]
    for k in (1, 2):
        for version in versions:
            keepers = [n for n in names if keeps_warm(n, version, members, k)]
            assert keepers == sorted(rendezvous.top(version.name, names, k))
    # A drained executor keeps none; its share goes to the others.
    drained = [member("a", draining=True), *members[1:]]
    assert not any(keeps_warm("a", v, drained, 1) for v in versions)
    for version in versions:
        keepers = [n for n in names[1:] if keeps_warm(n, version, drained, 1)]
        assert len(keepers) == 1
    # Alone, or before the fleet knows it: every version it is asked for.
    assert keeps_warm("z", versions[0], members, 1)
    assert keeps_warm("a", versions[0], [], 1)


@pytest.mark.parametrize(
    ("holder", "requester", "placed_on", "live", "draining", "taken"),
    [
        ("e1", "e1", "e1", True, False, True),  # restarted under the same name
        ("e1", "e2", "e1", False, False, True),  # e1 left the fleet
        ("e1", "e2", "e1", True, True, True),  # e1 drained
        ("e1", "e2", "e2", True, False, True),  # the session moved to e2
        ("e1", "e2", "e1", True, False, False),  # e1 serves it: e2 must not run a turn beside it
        ("e1", "e2", "", True, False, False),  # never placed: the live holder keeps it
    ],
)
def test_a_lease_passes_only_from_a_holder_that_no_longer_serves_the_session(
    holder: str, requester: str, placed_on: str, live: bool, draining: bool, taken: bool
) -> None:
    assert fleet_rules.takes_over(
        holder=holder, requester=requester, placed_on=placed_on, holder_live=live,
        holder_draining=draining,
    ) is taken


def test_executor_names_and_heartbeats_are_checked() -> None:
    assert fleet_rules.executor_name("executors/corral-executor-0", "name") == "corral-executor-0"
    for bad in ("corral-executor-0", "executors/", "executors/Upper", "executors/a/b",
                "executors/-a", "executors/" + "a" * 101):
        with pytest.raises(InvalidArgument) as refused:
            fleet_rules.executor_name(bad, "name")
        assert refused.value.violations[0].field == "name"
    fleet_rules.check_beat("10.0.0.1:50064", 8, 0, 0)
    for address, capacity, in_use, field in [
        ("nohost", 8, 0, "executor.address"), ("h:0", 8, 0, "executor.address"),
        ("h:1", 0, 0, "executor.capacity"), ("h:1", 8, -1, "executor.sandboxes_in_use"),
    ]:
        with pytest.raises(InvalidArgument) as refused:
            fleet_rules.check_beat(address, capacity, in_use, 0)
        assert refused.value.violations[0].field == field


def test_only_a_platform_administrator_or_a_service_manages_the_fleet() -> None:
    fleet_rules.check_manager(Principal.of_service("router"), "list")
    fleet_rules.check_manager(
        Principal("acme", "root", frozenset({Role.ADMIN}), platform_admin=True), "drain")
    with pytest.raises(PermissionDenied):
        fleet_rules.check_manager(Principal("acme", "ann", frozenset({Role.ADMIN})), "drain")


def test_an_executor_keeps_its_generated_name_across_restarts(tmp_path: Path) -> None:
    first = executor_name("", tmp_path)
    assert fleet_rules.EXECUTOR_NAME.match(first)
    assert executor_name("", tmp_path) == first
    assert executor_name("corral-executor-1", tmp_path) == "corral-executor-1"
    assert executor_name("", tmp_path / "other") != first
