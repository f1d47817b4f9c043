"""Publishing with the start check, against in-memory fakes: a version is started once before
DEFAULT moves to it; one that cannot start is kept as FAILED and refused the same way every time;
an unreachable executor leaves it CHECKING (required) or publishes it unchecked (if_reachable)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.bundle import digest_of
from corral.names import AgentRef, VersionRef
from services.common.endpoints import TrafficShare
from services.common.errors import FailedPrecondition, Unavailable
from services.common.execution import StartFailure
from services.common.identity import Caller
from services.common.settings import StartCheck
from services.registry.model import EndpointChange, VersionRecord, VersionState
from services.registry.publishing import Publishing
from services.registry.registry import Registry
from services.registry.rollout_model import TrafficTarget
from tests.bundles import SAYS_HI, packed_agent
from tests.fakes.registry import REGISTRY_TENANT, FakeVersionStarts, RegistryWorld, registry_world

pytestmark = pytest.mark.timeout(20)

ALICE = Caller(REGISTRY_TENANT, "alice")
AGENT = AgentRef("support")
DEFAULT = AGENT.endpoint("DEFAULT")
TRACEBACK = (
    'Traceback (most recent call last):\n  File "/bundle/agent.py", line 1, in <module>\n'
    "    import nowhere\nModuleNotFoundError: No module named 'nowhere'\n"
)


def checked_world(mode: StartCheck = StartCheck.REQUIRED) -> tuple[RegistryWorld, FakeVersionStarts]:
    world, starts = registry_world(), FakeVersionStarts()
    world.registry = Registry(world.store, world.rollouts, Publishing(world.store, starts, mode))
    return world, starts


def bundle(tmp: Path, prompt: str) -> bytes:
    return packed_agent(tmp, AGENT.agent, SAYS_HI, prompt=prompt)


async def default_of(world: RegistryWorld) -> tuple[TrafficShare, ...]:
    return (await world.registry.get_endpoint(ALICE, DEFAULT)).traffic


async def test_a_version_that_cannot_start_is_kept_failed_and_refused_the_same_each_time(
    tmp_path: Path,
) -> None:
    world, starts = checked_world()
    told: list[VersionRecord] = []

    async def checking(version: VersionRecord) -> None:
        told.append(version)

    v1, created = await world.registry.publish(ALICE, None, bundle(tmp_path, "v1"), "", "", checking)
    assert (v1.number, v1.state, created) == (1, VersionState.READY, True)
    assert [(v.number, v.state) for v in told] == [(1, VersionState.CHECKING)]
    broken = bundle(tmp_path, "v2")
    starts.failing[digest_of(broken)] = StartFailure("ModuleNotFoundError", "No module named 'nowhere'",
                                                     TRACEBACK)
    with pytest.raises(FailedPrecondition) as first:
        await world.registry.publish(ALICE, None, broken, "", "")
    assert first.value.reason == "VERSION_CANNOT_START"
    assert first.value.message.startswith("agents/support/versions/2 cannot start")
    assert first.value.message.endswith("ModuleNotFoundError: No module named 'nowhere'")
    assert first.value.metadata == {"version": "agents/support/versions/2",
                                    "error_type": "ModuleNotFoundError"}
    failed = await world.registry.get_version(ALICE, AGENT.version(2))
    assert failed.state is VersionState.FAILED and failed.failure is not None
    assert failed.failure.traceback == TRACEBACK
    assert await default_of(world) == (TrafficShare(1, 10_000),)

    with pytest.raises(FailedPrecondition) as again:
        await world.registry.publish(ALICE, None, broken, "", "")
    assert again.value.message == first.value.message
    assert starts.started == [AGENT.version(1), AGENT.version(2)]  # not started a second time
    published = [e.details for e in world.store.events if e.method == "PublishVersion"]
    assert [(d["state"], d["start_check"]) for d in published] == [
        ("READY", "passed"), ("FAILED", "failed")]

    with pytest.raises(FailedPrecondition) as routed:
        await world.registry.set_endpoint(
            ALICE, AGENT.endpoint("prod"),
            EndpointChange((TrafficTarget(AGENT.version(2), 100),), None), allow_missing=True)
    assert routed.value.reason == "VERSION_NOT_READY"


async def test_with_the_executor_down_required_waits_and_if_reachable_publishes_unchecked(
    tmp_path: Path,
) -> None:
    world, starts = checked_world(StartCheck.REQUIRED)
    starts.down = True
    first = bundle(tmp_path, "v1")
    with pytest.raises(Unavailable) as down:
        await world.registry.publish(ALICE, None, first, "", "")
    assert down.value.reason == "START_CHECK_UNAVAILABLE"
    waiting = await world.registry.get_version(ALICE, AGENT.version(1))
    assert waiting.state is VersionState.CHECKING
    assert (AGENT.agent, "DEFAULT") not in {(a, e) for (_, a, e) in world.store.endpoints}
    assert not [e for e in world.store.events if e.method == "PublishVersion"]

    # A newer version becomes DEFAULT first; the older one, checked later, does not take it back.
    starts.down = False
    v2, _ = await world.registry.publish(ALICE, None, bundle(tmp_path, "v2"), "", "")
    v1, created = await world.registry.publish(ALICE, None, first, "", "")
    assert (v1.number, v1.state, created, v2.number) == (1, VersionState.READY, False, 2)
    assert await default_of(world) == (TrafficShare(2, 10_000),)

    lenient, starts = checked_world(StartCheck.IF_REACHABLE)
    starts.down = True
    unchecked, _ = await lenient.registry.publish(ALICE, None, first, "", "")
    assert unchecked.state is VersionState.READY
    assert await default_of(lenient) == (TrafficShare(1, 10_000),)
    assert lenient.store.events[-1].details["start_check"] == "skipped"


async def test_a_version_left_checking_is_published_unchecked_once_the_check_is_off(
    tmp_path: Path,
) -> None:
    world, starts = checked_world()
    starts.down = True
    data = bundle(tmp_path, "v1")
    with pytest.raises(Unavailable):
        await world.registry.publish(ALICE, None, data, "", "")
    world.registry = Registry(world.store, world.rollouts, Publishing(world.store))
    version, _ = await world.registry.publish(ALICE, None, data, "", "")
    assert version.state is VersionState.READY and starts.started == []
    by_digest = await world.registry.get_version(ALICE, VersionRef(AGENT.agent, digest=digest_of(data)))
    assert by_digest == version
