"""The registry as a client sees it: publishing bundles (idempotent, numbered, concurrent),
serving and downloading versions, refusing bad uploads clearly without storing anything,
and unknown or malformed names."""

from __future__ import annotations

import asyncio
import hashlib
import tarfile
from collections.abc import Awaitable

import grpc
import pytest

from corral.bundle import digest_of
from corral.client import CorralClient
from corral.config import ClientConfig
from corral.registry.v1 import registry_pb2 as pb
from tests.bundles import SAYS_HI, agent_files, link, publish_requests, tar_of, write_bundle
from tests.credentials import token
from tests.registry_client import ALICE, Registry
from tests.rpc import error_details, fails

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


# -- publishing -------------------------------------------------------------------------------


async def test_publish_is_idempotent_and_a_change_makes_the_next_version(
    registry: Registry,
) -> None:
    a = registry.agent
    data = registry.bundle()
    # Through the synchronous client, as the corral command does (in a thread: the server runs
    # on this event loop).
    client = CorralClient(ClientConfig(addrs=registry.settings.addrs,
                                       credential=token("acme", "alice")))
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
