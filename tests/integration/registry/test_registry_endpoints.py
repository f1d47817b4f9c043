"""The registry as a client sees it: creating and updating endpoints, their traffic checked,
guarded by etags and changed field by field under an update mask."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import pytest
from google.protobuf import field_mask_pb2

from corral.registry.v1 import registry_pb2 as pb
from tests.registry_client import ALICE, Registry
from tests.rpc import error_details, fails

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


# -- endpoints --------------------------------------------------------------------------------


async def test_endpoint_updates_are_checked_and_guarded_by_etags(registry: Registry) -> None:
    a, stub = registry.agent, registry.stub
    for i in range(3):
        await registry.publish(registry.bundle(prompt=f"v{i}\n"))
    prod = await stub.CreateEndpoint(
        pb.CreateEndpointRequest(
            parent=f"agents/{a}",
            endpoint_id="prod",
            endpoint=registry.body("prod", [(2, 10), (1, 90)]),
        ),
        metadata=ALICE,
    )
    assert prod.name == f"agents/{a}/endpoints/prod" and not prod.follow_latest
    assert [(t.version, t.percent) for t in prod.traffic] == [
        (f"agents/{a}/versions/1", 90.0),
        (f"agents/{a}/versions/2", 10.0),
    ]
    assert prod.salt and prod.etag and prod.revision == 1

    err = await fails(
        grpc.StatusCode.ALREADY_EXISTS,
        stub.CreateEndpoint(
            pb.CreateEndpointRequest(
                parent=f"agents/{a}", endpoint_id="prod", endpoint=registry.body("prod", [(1, 100)])
            )
        ),
    )
    assert prod.name in (err.details() or "")

    def update(
        split: list[tuple[int, float]], etag: str = "", endpoint: str = "prod"
    ) -> Awaitable[pb.Endpoint]:
        return stub.UpdateEndpoint(
            pb.UpdateEndpointRequest(endpoint=registry.body(endpoint, split, etag)), metadata=ALICE
        )

    err = await fails(grpc.StatusCode.INVALID_ARGUMENT, update([(1, 50), (2, 40)]))
    assert error_details(err)[1] == ["endpoint.traffic"] and "90%" in (err.details() or "")
    err = await fails(grpc.StatusCode.INVALID_ARGUMENT, update([(1, 50), (2, float("nan"))]))
    assert error_details(err)[1] == ["endpoint.traffic[1].percent"]
    err = await fails(grpc.StatusCode.FAILED_PRECONDITION, update([(1, 50), (7, 50)]))
    info, _ = error_details(err)
    assert info.reason == "VERSION_NOT_FOUND" and "no version 7" in (err.details() or "")
    foreign = registry.body("prod", [(1, 100)])
    foreign.traffic[0].version = "agents/someone-else/versions/1"
    err = await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.UpdateEndpoint(pb.UpdateEndpointRequest(endpoint=foreign)),
    )
    assert error_details(err)[1] == ["endpoint.traffic[0].version"]
    err = await fails(grpc.StatusCode.FAILED_PRECONDITION, update([(1, 100)], endpoint="DEFAULT"))
    assert error_details(err)[0].reason == "DEFAULT_ENDPOINT_READ_ONLY"
    assert "newest version" in (err.details() or "")
    # None of the refused updates changed anything.
    assert await registry.endpoint("prod") == prod

    moved = await update([(1, 50), (2, 25), (3, 25)], etag=prod.etag)
    assert moved.revision == 2 and moved.etag != prod.etag and moved.salt == prod.salt
    assert [t.percent for t in moved.traffic] == [50.0, 25.0, 25.0]
    err = await fails(grpc.StatusCode.ABORTED, update([(3, 100)], etag=prod.etag))
    info, _ = error_details(err)
    assert info.reason == "ETAG_MISMATCH" and "read it again" in (err.details() or "")
    assert await registry.endpoint("prod") == moved
    # Without an etag the last writer wins.
    assert (await update([(3, 100)])).revision == 3

    # allow_missing creates; without it a missing endpoint is NOT_FOUND.
    await fails(grpc.StatusCode.NOT_FOUND, update([(1, 100)], endpoint="staging"))
    staging = await stub.UpdateEndpoint(
        pb.UpdateEndpointRequest(endpoint=registry.body("staging", [(3, 100)]), allow_missing=True)
    )
    assert staging.revision == 1 and staging.salt != prod.salt
    listed = await stub.ListEndpoints(pb.ListEndpointsRequest(parent=f"agents/{a}"))
    assert [e.name.rsplit("/", 1)[1] for e in listed.endpoints] == ["DEFAULT", "prod", "staging"]


async def test_an_update_mask_changes_only_the_fields_it_names(registry: Registry) -> None:
    a, stub = registry.agent, registry.stub
    for i in range(2):
        await registry.publish(registry.bundle(prompt=f"v{i}\n"))
    body = registry.body("prod", [(1, 100)])
    body.description = "the one users reach"
    prod = await stub.UpdateEndpoint(
        pb.UpdateEndpointRequest(endpoint=body, allow_missing=True), metadata=ALICE
    )

    def update(
        split: list[tuple[int, float]], description: str, *paths: str
    ) -> Awaitable[pb.Endpoint]:
        changed = registry.body("prod", split)
        changed.description = description
        mask = field_mask_pb2.FieldMask(paths=list(paths))
        return stub.UpdateEndpoint(
            pb.UpdateEndpointRequest(endpoint=changed, update_mask=mask), metadata=ALICE
        )

    # Only the description: the traffic in the request is ignored, even a split that is wrong.
    described = await update([(1, 50)], "the stable one", "description")
    assert described.description == "the stable one" and described.revision == prod.revision + 1
    assert list(described.traffic) == list(prod.traffic)
    # Only the traffic: the description stays.
    moved = await update([(1, 50), (2, 50)], "", "traffic")
    assert moved.description == "the stable one"
    assert [t.percent for t in moved.traffic] == [50.0, 50.0]
    # Both named, or no mask at all: both are replaced, as before masks existed.
    both = await update([(2, 100)], "all on v2", "traffic", "description")
    assert both.description == "all on v2" and [t.version for t in both.traffic] == [
        f"agents/{a}/versions/2"
    ]
    unmasked = await update([(1, 100)], "")
    assert unmasked.description == "" and [t.version for t in unmasked.traffic] == [
        f"agents/{a}/versions/1"
    ]

    for paths in (["salt"], ["traffic", "etag"], ["name"]):
        err = await fails(grpc.StatusCode.INVALID_ARGUMENT, update([(1, 100)], "x", *paths))
        assert error_details(err)[1] == ["update_mask"], paths
        assert "cannot be changed" in (err.details() or "")
    # Creating an endpoint needs its traffic.
    missing = registry.body("staging", [(1, 100)])
    err = await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.UpdateEndpoint(pb.UpdateEndpointRequest(
            endpoint=missing, allow_missing=True,
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        )),
    )
    assert error_details(err)[1] == ["update_mask"]
    assert await registry.endpoint("prod") == unmasked
