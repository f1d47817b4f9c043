"""The registry as a client sees it: the audit log of who changed what, and the endpoint
changes streamed to watchers from any replica."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from corral.registry.v1 import registry_pb2 as pb
from corral.registry.v1 import registry_pb2_grpc
from tests import harness
from tests.registry_client import ALICE, Registry
from tests.rpc import channel_as, described, fails, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


# -- auditing ---------------------------------------------------------------------------------


async def test_the_audit_log_records_who_changed_what(registry: Registry) -> None:
    a, stub = registry.agent, registry.stub
    await registry.publish(registry.bundle(), metadata=who("acme", "alice"))
    await registry.publish(registry.bundle(prompt="v2\n"), metadata=who("acme", "alice"))
    await stub.UpdateEndpoint(
        pb.UpdateEndpointRequest(endpoint=registry.body("prod", [(1, 100)]), allow_missing=True),
        metadata=who("acme", "bob"),
    )
    await stub.UpdateEndpoint(
        pb.UpdateEndpointRequest(endpoint=registry.body("prod", [(1, 80), (2, 20)])),
        metadata=who("acme", "carol"),
    )
    # Another tenant's endpoint of the same name does not exist for it; nor is that recorded.
    await fails(
        grpc.StatusCode.NOT_FOUND,
        stub.UpdateEndpoint(
            pb.UpdateEndpointRequest(endpoint=registry.body("prod", [(1, 100)])),
            metadata=who("globex", "carol"),
        ),
    )
    # A refused change is not recorded.
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.UpdateEndpoint(
            pb.UpdateEndpointRequest(endpoint=registry.body("prod", [(1, 10)])),
            metadata=who("acme", "mallory"),
        ),
    )
    events = (
        await stub.ListAuditEvents(
            pb.ListAuditEventsRequest(resource_prefix=f"agents/{a}/endpoints/prod")
        )
    ).events
    # Newest first.
    assert [(e.tenant, e.user, e.method) for e in events] == [
        ("acme", described(who("acme", "carol")), "UpdateEndpoint"),
        ("acme", described(who("acme", "bob")), "UpdateEndpoint"),
    ]
    latest = events[0]
    assert latest.resource == f"agents/{a}/endpoints/prod"
    assert dict(latest.details["before"]) == {"1": 100.0}
    assert dict(latest.details["after"]) == {"1": 80.0, "2": 20.0}
    assert latest.time.ToDatetime() >= events[1].time.ToDatetime()

    published = (
        await stub.ListAuditEvents(
            pb.ListAuditEventsRequest(resource_prefix=f"agents/{a}/versions/")
        )
    ).events
    alice = described(who("acme", "alice"))
    assert [(e.resource, e.user, e.method) for e in published] == [
        (f"agents/{a}/versions/2", alice, "PublishVersion"),
        (f"agents/{a}/versions/1", alice, "PublishVersion"),
    ]
    assert published[1].details["digest"].startswith("sha256:")
    # The prefix is a prefix, not a pattern: "_" and "%" match only themselves.
    assert not (
        await stub.ListAuditEvents(pb.ListAuditEventsRequest(resource_prefix=f"agents/{a}/%"))
    ).events


# -- watching ---------------------------------------------------------------------------------


async def next_message(call: object, timeout: float = 5.0) -> pb.WatchEndpointsResponse:
    message = await asyncio.wait_for(call.read(), timeout)  # type: ignore[attr-defined]
    assert message is not grpc.aio.EOF, "the watch ended"
    return message  # type: ignore[no-any-return]


async def test_watch_sends_a_snapshot_then_each_change_from_any_replica(
    registry: Registry,
) -> None:
    a, stub = registry.agent, registry.stub
    await registry.publish(registry.bundle())
    await stub.UpdateEndpoint(
        pb.UpdateEndpointRequest(endpoint=registry.body("prod", [(1, 100)]), allow_missing=True)
    )
    # Another agent's changes are not sent to a watcher of this one.
    other = await registry.publish(registry.bundle(name=f"{a}-other"))
    watch = stub.WatchEndpoints(pb.WatchEndpointsRequest(parent=f"agents/{a}"))
    everything = stub.WatchEndpoints(pb.WatchEndpointsRequest())
    # A second registry replica on the same database, on a port of its own.
    replica = await harness.start_service("registry", registry.settings)
    try:
        snapshot = await next_message(watch)
        assert snapshot.snapshot
        assert sorted(e.name for e in snapshot.endpoints) == [
            f"agents/{a}/endpoints/DEFAULT",
            f"agents/{a}/endpoints/prod",
        ]
        all_snapshot = await next_message(everything)
        assert {
            f"agents/{a}/endpoints/prod",
            f"{other.name.split('/versions')[0]}/endpoints/DEFAULT",
        } <= {e.name for e in all_snapshot.endpoints}

        await registry.publish(registry.bundle(prompt="v2\n"))
        change = await next_message(watch)
        assert not change.snapshot
        assert [(e.name, [t.version for t in e.traffic]) for e in change.endpoints] == [
            (f"agents/{a}/endpoints/DEFAULT", [f"agents/{a}/versions/2"])
        ]

        async with channel_as(replica.address, ALICE) as channel:
            second = registry_pb2_grpc.RegistryServiceStub(channel)
            await registry.publish(registry.bundle(name=f"{a}-other", prompt="v2\n"))
            updated = await second.UpdateEndpoint(
                pb.UpdateEndpointRequest(endpoint=registry.body("prod", [(1, 50), (2, 50)]))
            )
        change = await next_message(watch)
        assert list(change.endpoints) == [updated]
        # The all-agents watcher saw all three changes, in commit order (amid any other agents'
        # changes: the database is shared by the run).
        seen: list[str] = []
        while len(seen) < 3:
            names = [e.name for e in (await next_message(everything)).endpoints]
            seen += [n for n in names if n.startswith((f"agents/{a}/", f"agents/{a}-other/"))]
        assert seen == [
            f"agents/{a}/endpoints/DEFAULT",
            f"agents/{a}-other/endpoints/DEFAULT",
            f"agents/{a}/endpoints/prod",
        ]
    finally:
        watch.cancel()
        everything.cancel()
        await replica.stop(grace=0.5)
    await fails(
        grpc.StatusCode.NOT_FOUND,
        next_message(stub.WatchEndpoints(pb.WatchEndpointsRequest(parent=f"agents/{a}-nope"))),
    )


async def test_a_lost_listen_connection_ends_watches_and_the_next_watch_sees_later_changes(
    registry: Registry,
) -> None:
    """PostgreSQL restarting (here: its backend for the registry's LISTEN terminated) once left
    the registry deaf to endpoint changes while routers believed they were current."""
    import asyncpg

    from services.registry.store import WATCH_APPLICATION

    stub = registry.stub
    await registry.publish(registry.bundle())
    watch = stub.WatchEndpoints(pb.WatchEndpointsRequest(parent=f"agents/{registry.agent}"))
    assert (await next_message(watch)).snapshot
    conn = await asyncpg.connect(registry.settings.database_url)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = current_database()",
            WATCH_APPLICATION,
        )
    finally:
        await conn.close()
    assert killed >= 1
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(watch.read(), 10)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "endpoint changes" in (ended.value.details() or "")
    again = stub.WatchEndpoints(pb.WatchEndpointsRequest(parent=f"agents/{registry.agent}"))
    try:
        assert (await next_message(again, 10)).snapshot
        await stub.UpdateEndpoint(
            pb.UpdateEndpointRequest(endpoint=registry.body("prod", [(1, 100)]), allow_missing=True)
        )
        change = await next_message(again)
        assert [e.name for e in change.endpoints] == [f"agents/{registry.agent}/endpoints/prod"]
    finally:
        again.cancel()
