"""The registry as a client sees it: a real grpc.aio server on real PostgreSQL, publishing bundles,
serving versions, managing endpoints, auditing changes and streaming them to watchers."""

from __future__ import annotations

import asyncio
import hashlib
import tarfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2

from corral.bundle import digest_of
from corral.client import CorralClient
from corral.config import ClientConfig
from corral.registry.v1 import registry_pb2 as pb
from corral.registry.v1 import registry_pb2_grpc
from services.common.settings import Settings
from tests import harness
from tests.bundles import (
    SAYS_HI,
    agent_files,
    link,
    packed_agent,
    publish_requests,
    tar_of,
    write_bundle,
)
from tests.rpc import Metadata, error_details, fails, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ALICE = who("acme")


@dataclass
class Registry:
    settings: Settings
    stub: registry_pb2_grpc.RegistryServiceAsyncStub
    tmp: Path
    agent: str

    def bundle(self, name: str = "", prompt: str = "You help.\n", **extra: str | bytes) -> bytes:
        """The packed bytes of a small agent (this test's agent unless `name` is given)."""
        return packed_agent(self.tmp, name or self.agent, prompt=prompt, **extra)

    async def publish(self, data: bytes, metadata: Metadata = ALICE, **header: str) -> pb.Version:
        return await self.stub.PublishVersion(
            iter(publish_requests(data, **header)),
            metadata=metadata,  # type: ignore[arg-type]
        )

    async def versions(self) -> list[int]:
        listed = await self.stub.ListVersions(pb.ListVersionsRequest(parent=f"agents/{self.agent}"))
        return [v.number for v in listed.versions]

    async def endpoint(self, endpoint: str) -> pb.Endpoint:
        return await self.stub.GetEndpoint(
            pb.GetEndpointRequest(name=f"agents/{self.agent}/endpoints/{endpoint}")
        )

    def body(
        self, endpoint: str, split: Iterable[tuple[int, float]], etag: str = ""
    ) -> pb.Endpoint:
        return pb.Endpoint(
            name=f"agents/{self.agent}/endpoints/{endpoint}",
            etag=etag,
            traffic=[
                pb.TrafficTarget(version=f"agents/{self.agent}/versions/{v}", percent=p)
                for v, p in split
            ],
        )


@pytest_asyncio.fixture
async def registry(
    services: harness.Platform, tmp_path: Path
) -> AsyncIterator[Registry]:
    await services.start("registry")
    async with grpc.aio.insecure_channel(services.settings.addrs["registry"]) as channel:
        # The database is shared by the whole run: an agent of its own keeps each test apart.
        yield Registry(
            services.settings,
            registry_pb2_grpc.RegistryServiceStub(channel),
            tmp_path,
            f"a-{uuid.uuid4().hex[:10]}",
        )


# -- publishing -------------------------------------------------------------------------------


async def test_publish_is_idempotent_and_a_change_makes_the_next_version(
    registry: Registry,
) -> None:
    a = registry.agent
    data = registry.bundle()
    # Through the synchronous client, as the corral command does (in a thread: the server runs
    # on this event loop).
    client = CorralClient(ClientConfig(addrs=registry.settings.addrs, tenant="acme", user="alice"))
    root = write_bundle(registry.tmp / "first", agent_files(a, SAYS_HI))
    try:
        first = await asyncio.to_thread(client.publish, root)
    finally:
        client.close()
    assert first.name == f"agents/{a}/versions/1" and first.number == 1
    assert first.digest == digest_of(data) and first.size_bytes == len(data)
    assert first.creator == "alice"
    m = first.manifest
    assert (m.agent, m.entrypoint, m.protocol) == (a, "agent:app", pb.AGENT_PROTOCOL_CORRAL)
    assert (m.model_provider, m.model_id, m.prompt_file) == ("scripted", "scripted-1", "prompt.md")
    assert (m.timeout_s, m.idle_timeout_s, m.max_lifetime_s) == (900, 900, 28800)

    again = await registry.publish(data)
    assert again == first
    default = await registry.endpoint("DEFAULT")
    assert default.follow_latest and [(t.version, t.percent) for t in default.traffic] == [
        (f"agents/{a}/versions/1", 100.0)
    ]

    second = await registry.publish(registry.bundle(prompt="You help, briefly.\n"))
    assert second.name == f"agents/{a}/versions/2" and second.digest != first.digest
    assert await registry.versions() == [1, 2]
    agent = await registry.stub.GetAgent(pb.GetAgentRequest(name=f"agents/{a}"))
    assert agent.latest_version == f"agents/{a}/versions/2"

    # DEFAULT follows the newest version, and republishing an old bundle does not move it back.
    moved = await registry.endpoint("DEFAULT")
    assert [t.version for t in moved.traffic] == [f"agents/{a}/versions/2"]
    assert moved.revision == default.revision + 1 and moved.salt == default.salt
    assert (await registry.publish(data)).number == 1
    assert (await registry.endpoint("DEFAULT")).revision == moved.revision
    assert await registry.versions() == [1, 2]


async def test_concurrent_publishes_get_distinct_numbers(registry: Registry) -> None:
    bundles = [registry.bundle(prompt=f"Prompt {i}.\n") for i in range(5)]
    # Each bundle twice at once: five versions, and both copies of a bundle get the same one.
    results = await asyncio.gather(*(registry.publish(b) for b in bundles + bundles))
    numbers = [v.number for v in results]
    assert sorted(set(numbers)) == [1, 2, 3, 4, 5]
    assert numbers[:5] == numbers[5:]
    assert await registry.versions() == [1, 2, 3, 4, 5]


async def test_get_version_by_number_and_digest_and_download_it(registry: Registry) -> None:
    # Big enough to arrive in several chunks both ways.
    data = registry.bundle(**{"data/blob.bin": hashlib.sha256(b"x").digest() * 100_000})
    version = await registry.publish(data)
    by_number = await registry.stub.GetVersion(pb.GetVersionRequest(name=version.name))
    by_digest = await registry.stub.GetVersion(
        pb.GetVersionRequest(name=f"agents/{registry.agent}/versions/{version.digest}")
    )
    assert by_number == by_digest == version

    messages = [
        m async for m in registry.stub.DownloadVersion(pb.DownloadVersionRequest(name=version.name))
    ]
    assert messages[0].WhichOneof("part") == "version" and messages[0].version == version
    chunks = [m.chunk for m in messages[1:]]
    assert len(chunks) > 1 and all(m.WhichOneof("part") == "chunk" for m in messages[1:])
    downloaded = b"".join(chunks)
    assert "sha256:" + hashlib.sha256(downloaded).hexdigest() == version.digest
    assert downloaded == data


# -- bad uploads ------------------------------------------------------------------------------


def bad_toml(agent: str) -> dict[str, tuple[bytes, str, str]]:
    """Uploads whose agent.toml is wrong: case → (agent.toml, field, words in the message)."""
    good = f'name = "{agent}"\nentrypoint = "agent:app"\n'
    return {
        "toml syntax": (good + "[model\n", "agent.toml:(file)", "not valid TOML"),
        "missing name": ('entrypoint = "agent:app"\n', "agent.toml:name", "is required"),
        "unknown key": (good + 'colour = "red"\n', "agent.toml:colour", "unknown key"),
        "bad provider": (
            good + '[model]\nprovider = "skynet"\n',
            "agent.toml:model.provider",
            "skynet",
        ),
        "prompt missing": (
            good + '[prompt]\nfile = "nope.md"\n',
            "agent.toml:prompt.file",
            "nope.md",
        ),
        # JSON (how params are stored and sent) has no dates.
        "date in params": (
            good + "[model]\nparams = { since = 2024-01-01 }\n",
            "agent.toml:model.params.since",
            "date",
        ),
    }


BAD_TARS = {
    # case → (extra entries, field, words in the message)
    "dot-dot path": ((("../evil.py", b"x"),), "bundle:../evil.py", "'..' is not allowed"),
    "absolute path": ((("/etc/evil", b"x"),), "bundle:/etc/evil", "absolute paths"),
    "symlink outside": ((link("lib", "../../etc"),), "bundle:lib", "outside the bundle"),
    "symlink chain": ((link("a", "."), link("b", "a/..")), "bundle:b", "outside the bundle"),
    "hard link": ((link("hard", "agent.py", tarfile.LNKTYPE),), "bundle:hard", "hard links"),
}


async def test_bad_uploads_are_refused_clearly_and_store_nothing(registry: Registry) -> None:
    a = registry.agent
    await registry.publish(registry.bundle())
    endpoint_before = await registry.endpoint("DEFAULT")
    audit_before = await registry.stub.ListAuditEvents(
        pb.ListAuditEventsRequest(resource_prefix=f"agents/{a}/")
    )
    good = registry.bundle(prompt="Another prompt.\n")
    code = SAYS_HI.encode()

    # case → (request stream, status, field, words in the message)
    cases: dict[str, tuple[list[pb.PublishVersionRequest], grpc.StatusCode, str, str]] = {}
    for case, (toml, field, words) in bad_toml(a).items():
        data = tar_of(("agent.toml", toml.encode()), ("agent.py", code), ("prompt.md", b"p"))
        cases[case] = (
            publish_requests(data),
            grpc.StatusCode.INVALID_ARGUMENT,
            field,
            words,
        )
    manifest = ("agent.toml", f'name = "{a}"\nentrypoint = "agent:app"\n'.encode())
    for case, (extra, field, words) in BAD_TARS.items():
        data = tar_of(manifest, ("agent.py", code), *extra)
        cases[case] = (
            publish_requests(data),
            grpc.StatusCode.INVALID_ARGUMENT,
            field,
            words,
        )
    blob = b"this is not a tar archive, just some bytes " * 20
    cases["not a tar"] = (
        publish_requests(blob),
        grpc.StatusCode.INVALID_ARGUMENT,
        "bundle:(archive)",
        "not a tar",
    )
    header, *chunks = publish_requests(good)
    cases["empty stream"] = ([], grpc.StatusCode.INVALID_ARGUMENT, "header", "empty")
    cases["header only"] = (
        [publish_requests(b"")[0]],
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunk",
        "no bundle bytes",
    )
    cases["header not first"] = (
        [*chunks, header],
        grpc.StatusCode.INVALID_ARGUMENT,
        "header",
        "must be the first message",
    )
    cases["header twice"] = (
        [header, header, *chunks],
        grpc.StatusCode.INVALID_ARGUMENT,
        "header",
        "sent twice",
    )
    cases["digest mismatch"] = (
        publish_requests(good, digest=digest_of(b"other")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "header.digest",
        "does not match",
    )
    short = publish_requests(good)
    short[0].header.size_bytes += 1
    cases["size mismatch"] = (
        short,
        grpc.StatusCode.INVALID_ARGUMENT,
        "header.size_bytes",
        "arrived",
    )
    cases["parent mismatch"] = (
        publish_requests(good, parent="agents/someone-else"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "header.parent",
        "does not match",
    )

    for case, (requests, status, field, words) in cases.items():
        err = await fails(status, registry.stub.PublishVersion(iter(requests), metadata=ALICE))
        info, fields = error_details(err)
        assert fields == [field], (case, fields, err.details())
        assert words in (err.details() or ""), (case, err.details())
        assert info.domain == "registry" and info.reason, case

    # Nothing was stored by any of them.
    assert await registry.versions() == [1]
    assert (await registry.endpoint("DEFAULT")).revision == endpoint_before.revision
    audit_after = await registry.stub.ListAuditEvents(
        pb.ListAuditEventsRequest(resource_prefix=f"agents/{a}/")
    )
    assert audit_after == audit_before
    # A bad bundle for a new agent does not create the agent either.
    fresh = f"{a}-new"
    data = tar_of(
        ("agent.toml", f'name = "{fresh}"\nentrypoint = "agent:app"\n'.encode()), ("../x", b"")
    )
    await fails(grpc.StatusCode.INVALID_ARGUMENT, registry.publish(data))
    await fails(
        grpc.StatusCode.NOT_FOUND,
        registry.stub.GetAgent(pb.GetAgentRequest(name=f"agents/{fresh}")),
    )


async def test_unknown_things_are_not_found_and_malformed_names_invalid(registry: Registry) -> None:
    a = registry.agent
    version = await registry.publish(registry.bundle())
    stub = registry.stub
    not_found: list[Awaitable[object]] = [
        stub.GetAgent(pb.GetAgentRequest(name=f"agents/{a}-nope")),
        stub.ListVersions(pb.ListVersionsRequest(parent=f"agents/{a}-nope")),
        stub.ListEndpoints(pb.ListEndpointsRequest(parent=f"agents/{a}-nope")),
        stub.GetVersion(pb.GetVersionRequest(name=f"agents/{a}/versions/99")),
        stub.GetVersion(pb.GetVersionRequest(name=f"agents/{a}-nope/versions/1")),
        stub.GetVersion(pb.GetVersionRequest(name=f"agents/{a}/versions/sha256:{'0' * 64}")),
        stub.GetEndpoint(pb.GetEndpointRequest(name=f"agents/{a}/endpoints/prod")),
        stub.UpdateEndpoint(pb.UpdateEndpointRequest(endpoint=registry.body("prod", [(1, 100)]))),
    ]
    for call in not_found:
        err = await fails(grpc.StatusCode.NOT_FOUND, call)
        assert f"agents/{a}" in (err.details() or "")

    async def download(name: str) -> None:
        async for _ in stub.DownloadVersion(pb.DownloadVersionRequest(name=name)):
            pass

    err = await fails(grpc.StatusCode.NOT_FOUND, download(f"agents/{a}/versions/2"))
    assert f"agents/{a}/versions/2" in (err.details() or "")
    other = pb.Endpoint(
        name=f"agents/{a}-nope/endpoints/prod",
        traffic=[pb.TrafficTarget(version=f"agents/{a}-nope/versions/1", percent=100)],
    )
    await fails(
        grpc.StatusCode.NOT_FOUND,
        stub.UpdateEndpoint(pb.UpdateEndpointRequest(endpoint=other, allow_missing=True)),
    )

    invalid: dict[str, Awaitable[object]] = {
        "name": stub.GetVersion(pb.GetVersionRequest(name=f"agents/{a}/versions/one")),
        "endpoint.name": stub.UpdateEndpoint(
            pb.UpdateEndpointRequest(endpoint=pb.Endpoint(name=f"agents/{a}/prod"))
        ),
        "endpoint_id": stub.CreateEndpoint(
            pb.CreateEndpointRequest(parent=f"agents/{a}", endpoint_id="9lives")
        ),
        "parent": stub.CreateEndpoint(
            pb.CreateEndpointRequest(parent="agents/Bad", endpoint_id="prod")
        ),
    }
    for field, call in invalid.items():
        err = await fails(grpc.StatusCode.INVALID_ARGUMENT, call)
        assert error_details(err)[1] == [field]
    err = await fails(grpc.StatusCode.INVALID_ARGUMENT, download("sessions/x"))
    assert error_details(err)[1] == ["name"]
    assert (await stub.GetVersion(pb.GetVersionRequest(name=version.name))) == version


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
        metadata=who("globex", "carol"),
    )
    # A refused change is not recorded.
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.UpdateEndpoint(
            pb.UpdateEndpointRequest(endpoint=registry.body("prod", [(1, 10)])),
            metadata=who("x", "mallory"),
        ),
    )
    events = (
        await stub.ListAuditEvents(
            pb.ListAuditEventsRequest(resource_prefix=f"agents/{a}/endpoints/prod")
        )
    ).events
    # Newest first.
    assert [(e.tenant, e.user, e.method) for e in events] == [
        ("globex", "carol", "UpdateEndpoint"),
        ("acme", "bob", "UpdateEndpoint"),
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
    assert [(e.resource, e.user, e.method) for e in published] == [
        (f"agents/{a}/versions/2", "alice", "PublishVersion"),
        (f"agents/{a}/versions/1", "alice", "PublishVersion"),
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

        async with grpc.aio.insecure_channel(replica.address) as channel:
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
