"""The start check at publish, with every service real and a real sandbox: a new version is
started once before DEFAULT moves to it; one that cannot start is refused with its traceback,
kept as FAILED (the same answer on every retry) and never routed to; with no executor to start
it, publishing fails UNAVAILABLE and nothing moves until it is published again."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from click.testing import CliRunner, Result

from corral.bundle import pack
from corral.cli import cli
from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import registry_pb2_grpc, rollouts_pb2_grpc
from corral.registry.v1 import rollouts_pb2 as ro
from services.common.settings import Settings, StartCheck
from tests import harness
from tests.bundles import SAYS_HI, agent_files, publish_requests, write_bundle
from tests.credentials import public_channel, token
from tests.mesh import Mesh, connect
from tests.rpc import Metadata, error_details, fails, new_tenant, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NO_SUCH_MODULE = "import corral_no_such_module\nfrom corral.sdk import App\napp = App()\n"
BAD_SYNTAX = "from corral.sdk import App\napp = App(\n"
# An AgentCore-contract agent whose server takes connections and never answers one.
SILENT_SERVER = """
import socket, time
app = None
if __name__ == "__main__":
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 8080))
    listener.listen(16)
    while True:
        time.sleep(60)
"""
CHECK_TIMEOUT_S = 3.0


@pytest_asyncio.fixture
async def checked(settings: Settings, tmp_path: Path) -> AsyncIterator[Mesh]:
    """All five services, the start check required, a version given 3 s to start."""
    executor = replace(settings.executor, start_check_timeout_s=CHECK_TIMEOUT_S)
    platform = await harness.start_mesh(
        replace(settings, start_check=StartCheck.REQUIRED, executor=executor))
    try:
        async with connect(platform.settings, platform.hosts, tmp_path) as mesh:
            yield mesh
    finally:
        await platform.stop()


async def publish(mesh: Mesh, agent: str, code: str) -> reg.Version:
    root = write_bundle(mesh.tmp / uuid.uuid4().hex, agent_files(agent, code))
    return await mesh.publish(root)


async def version(mesh: Mesh, agent: str, number: int) -> reg.Version:
    return await mesh.registry.GetVersion(
        reg.GetVersionRequest(name=f"agents/{agent}/versions/{number}"), metadata=mesh.me)


async def default_versions(mesh: Mesh, agent: str) -> list[str]:
    default = await mesh.registry.GetEndpoint(
        reg.GetEndpointRequest(name=f"agents/{agent}/endpoints/DEFAULT"), metadata=mesh.me)
    return [t.version for t in default.traffic]


async def cannot_start(mesh: Mesh, agent: str, code: str) -> grpc.aio.AioRpcError:
    err = await fails(grpc.StatusCode.FAILED_PRECONDITION, publish(mesh, agent, code))
    assert error_details(err)[0].reason == "VERSION_CANNOT_START", err.details()
    return err


async def corral(mesh: Mesh, *args: str) -> Result:
    """The corral command as the mesh's tenant, its output as a user's pipe gets it."""
    env = {"CORRAL_REGISTRY_ADDR": mesh.settings.addrs["registry"],
           "CORRAL_TOKEN": token(mesh.tenant), "COLUMNS": "200"}
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env)


async def test_a_version_that_cannot_import_is_refused_kept_failed_and_never_routed_to(
    checked: Mesh,
) -> None:
    mesh, agent = checked, f"{checked.prefix}-sc"
    good = await publish(mesh, agent, SAYS_HI)
    assert good.number == 1 and good.state == reg.Version.STATE_READY
    assert await default_versions(mesh, agent) == [f"agents/{agent}/versions/1"]

    err = await cannot_start(mesh, agent, NO_SUCH_MODULE)
    details = err.details() or ""
    assert details.startswith(f"agents/{agent}/versions/2 cannot start"), details
    assert "ModuleNotFoundError: No module named 'corral_no_such_module'" in details
    assert error_details(err)[0].metadata["version"] == f"agents/{agent}/versions/2"
    failed = await version(mesh, agent, 2)
    assert failed.state == reg.Version.STATE_FAILED
    assert failed.failure.error_type == "ModuleNotFoundError"
    assert 'agent.py", line 1' in failed.failure.traceback
    assert "import corral_no_such_module" in failed.failure.traceback
    assert await default_versions(mesh, agent) == [f"agents/{agent}/versions/1"]
    # Another tenant sees no such version, failed or not.
    await fails(grpc.StatusCode.NOT_FOUND, mesh.registry.GetVersion(
        reg.GetVersionRequest(name=f"agents/{agent}/versions/2"), metadata=who(new_tenant())))

    # The same bytes again: the same version, the same answer, nothing new stored.
    again = await cannot_start(mesh, agent, NO_SUCH_MODULE)
    assert again.details() == err.details()
    listed = await mesh.registry.ListVersions(
        reg.ListVersionsRequest(parent=f"agents/{agent}"), metadata=mesh.me)
    assert [(v.number, v.state) for v in listed.versions] == [
        (1, reg.Version.STATE_READY), (2, reg.Version.STATE_FAILED)]

    syntax = await cannot_start(mesh, agent, BAD_SYNTAX)
    assert "SyntaxError" in (syntax.details() or "")
    assert (await version(mesh, agent, 3)).failure.error_type == "SyntaxError"
    assert await default_versions(mesh, agent) == [f"agents/{agent}/versions/1"]

    # Nothing routes to a FAILED version: not an invocation naming it, not an endpoint, not a
    # rollout.
    err = await fails(grpc.StatusCode.FAILED_PRECONDITION,
                      mesh.invoke(agent, {}, version=f"agents/{agent}/versions/2"))
    assert error_details(err)[0].reason == "VERSION_NOT_READY", err.details()
    await mesh.set_split(agent, "prod", [(1, 100)])
    err = await fails(grpc.StatusCode.FAILED_PRECONDITION, mesh.set_split(agent, "prod", [(2, 100)]))
    assert error_details(err)[0].reason == "VERSION_NOT_READY"
    assert "version 2 (FAILED)" in (err.details() or "")
    async with public_channel(mesh.settings.addrs["registry"]) as channel:
        rollouts = rollouts_pb2_grpc.RolloutServiceStub(channel)
        err = await fails(grpc.StatusCode.FAILED_PRECONDITION, rollouts.CreateRollout(
            ro.CreateRolloutRequest(parent=f"agents/{agent}/endpoints/prod", rollout=ro.Rollout(
                candidate_version=f"agents/{agent}/versions/3", strategy="all-at-once")),
            metadata=mesh.me))
        assert error_details(err)[0].reason == "VERSION_NOT_READY", err.details()

    # A version that starts moves DEFAULT past the failed ones, and serves.
    fixed = await publish(mesh, agent, SAYS_HI.replace("'hi'", "'fixed'"))
    assert (fixed.number, fixed.state) == (4, reg.Version.STATE_READY)
    default = await mesh.registry.GetEndpoint(
        reg.GetEndpointRequest(name=f"agents/{agent}/endpoints/DEFAULT"), metadata=mesh.me)
    assert [t.version for t in default.traffic] == [f"agents/{agent}/versions/4"]
    await mesh.router_sees(agent, "DEFAULT", default.revision)
    assert (await mesh.invoke(agent, {})).output == b"fixed"


async def test_corral_publish_says_what_it_does_and_shows_the_traceback(checked: Mesh) -> None:
    mesh, agent = checked, f"{checked.prefix}-cli"
    good = write_bundle(mesh.tmp / "good", agent_files(agent, SAYS_HI))
    result = await corral(mesh, "publish", str(good))
    assert result.exit_code == 0, result.output
    size = f"{len(pack(good)) / 1e3:.1f} kB"  # a small agent
    assert result.stderr.splitlines() == [
        f"uploading {size}...", "starting version 1 once to check it..."]
    assert result.stdout.startswith(f"published version 1 of {agent} (sha256:")
    assert result.stdout.rstrip().endswith("DEFAULT -> 1")

    broken = write_bundle(mesh.tmp / "broken", agent_files(agent, NO_SUCH_MODULE))
    result = await corral(mesh, "publish", str(broken))
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert lines[1] == "starting version 2 once to check it..."
    assert "version 2" in lines[2] and "cannot start" in lines[2] and "DEFAULT stays" in lines[2]
    assert "Traceback (most recent call last):" in result.stderr
    assert lines[-1] == "ModuleNotFoundError: No module named 'corral_no_such_module'"

    result = await corral(mesh, "versions", agent)
    assert result.exit_code == 0, result.output
    states = [row.split("│")[1:3] for row in result.stdout.splitlines() if "sha256" in row]
    assert [(n.strip(), s.strip()) for n, s in states] == [("1", "READY"), ("2", "FAILED")]


async def test_an_http_agent_whose_ping_never_answers_is_refused(checked: Mesh) -> None:
    agent = f"{checked.prefix}-silent"
    files = {"agent.toml": f'name = "{agent}"\nentrypoint = "server:app"\nprotocol = "http"\n',
             "server.py": SILENT_SERVER}
    err = await fails(grpc.StatusCode.FAILED_PRECONDITION,
                      checked.publish(write_bundle(checked.tmp / agent, files)))
    assert error_details(err)[0].reason == "VERSION_CANNOT_START"
    assert "GET /ping" in (err.details() or "")
    failed = await version(checked, agent, 1)
    assert failed.state == reg.Version.STATE_FAILED and failed.failure.error_type == "StartTimeout"
    assert f"did not answer GET /ping within {CHECK_TIMEOUT_S:g}s" in failed.failure.message
    await fails(grpc.StatusCode.NOT_FOUND, checked.registry.GetEndpoint(
        reg.GetEndpointRequest(name=f"agents/{agent}/endpoints/DEFAULT"), metadata=checked.me))
    # Stopped after the check: no sandbox is left running it.
    assert await checked.sandboxes() == []


async def published_once_reachable(
    stub: registry_pb2_grpc.RegistryServiceAsyncStub, requests: list[reg.PublishVersionRequest],
    metadata: Metadata,
) -> reg.Version:
    """Publishes again, as the error says, until the registry reaches the executor (its channel
    retries a refused connection after a backoff)."""
    async with asyncio.timeout(20):
        while True:
            try:
                return await stub.PublishVersion(iter(requests), metadata=metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            await asyncio.sleep(0.5)


async def test_with_no_executor_publish_is_unavailable_until_published_again(
    settings: Settings, tmp_path: Path,
) -> None:
    platform = harness.Platform(replace(settings, start_check=StartCheck.REQUIRED))
    tenant = new_tenant()
    agent = f"ne-{os.urandom(4).hex()}"
    requests = publish_requests(pack(write_bundle(tmp_path / "a", agent_files(agent, SAYS_HI))))
    try:
        await platform.start("telemetry", "sessions", "registry")
        async with public_channel(platform.settings.addrs["registry"]) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            err = await fails(grpc.StatusCode.UNAVAILABLE,
                              stub.PublishVersion(iter(requests), metadata=who(tenant)))
            assert error_details(err)[0].reason == "START_CHECK_UNAVAILABLE"
            assert "publish the same bundle again shortly" in (err.details() or "")
            stored = await stub.GetVersion(
                reg.GetVersionRequest(name=f"agents/{agent}/versions/1"), metadata=who(tenant))
            assert stored.state == reg.Version.STATE_CHECKING
            await fails(grpc.StatusCode.NOT_FOUND, stub.GetEndpoint(
                reg.GetEndpointRequest(name=f"agents/{agent}/endpoints/DEFAULT"),
                metadata=who(tenant)))

            await platform.start("executor")
            published = await published_once_reachable(stub, requests, who(tenant))
            assert (published.number, published.state) == (1, reg.Version.STATE_READY)
            default = await stub.GetEndpoint(
                reg.GetEndpointRequest(name=f"agents/{agent}/endpoints/DEFAULT"),
                metadata=who(tenant))
            assert [t.version for t in default.traffic] == [f"agents/{agent}/versions/1"]
    finally:
        await platform.stop()


@pytest.mark.skipif(harness.writable_cgroups() is None,
                    reason="needs writable memory, pids and cpu cgroups (root) to limit memory")
async def test_a_version_over_its_memory_limit_while_importing_is_refused(checked: Mesh) -> None:
    agent = f"{checked.prefix}-big"
    code = "hoard = bytearray(512 * 1024 * 1024)\n" + SAYS_HI
    root = write_bundle(checked.tmp / agent,
                        agent_files(agent, code, toml_extra="\n[resources]\nmemory_mb = 64\n"))
    err = await fails(grpc.StatusCode.FAILED_PRECONDITION, checked.publish(root))
    assert error_details(err)[0].reason == "VERSION_CANNOT_START", err.details()
    failed = await version(checked, agent, 1)
    assert failed.failure.error_type == "MemoryLimit", failed.failure
    assert "resources.memory_mb=64" in failed.failure.message
