"""Publishing an agent with dependencies, as a user would with `corral publish`: they travel
inside the bundle (so the sandbox needs no network), the same source is the same version, and the
registry refuses a bundle over its size limits while it is still arriving."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from click.testing import CliRunner

from corral.bundle import BundleLimits, pack, unpacked_size
from corral.cli import cli
from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import registry_pb2_grpc
from corral.router.v1 import router_pb2 as rt
from services.common.auth.assertions import AssertionVerifier
from services.common.auth.interceptor import Authenticator, AuthInterceptor
from services.common.auth.oidc import OidcVerifier
from services.common.auth.pki import load_identity
from services.common.interceptors import ErrorMappingInterceptor
from services.registry.servicer import RegistryServicer
from tests.bundles import agent_files, build_wheel, publish_requests, write_bundle
from tests.conftest import StartServices
from tests.credentials import public_channel, token
from tests.mesh import Mesh
from tests.rpc import error_details, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# The agent answers with what it imported and from where, so the test sees the vendored copy.
AGENT = """
import tinydep
from corral.sdk import App

app = App()


@app.entrypoint
def run(payload, ctx):
    return f"{tinydep.GREETING} from {tinydep.__file__}"
"""


async def corral(mesh: Mesh, *args: str) -> dict[str, Any]:
    """Runs the corral command as the mesh's tenant; in a thread, since its client blocks and
    the services serve on this event loop."""
    env = {"CORRAL_REGISTRY_ADDR": mesh.settings.addrs["registry"],
           "CORRAL_TOKEN": token(mesh.tenant),
           # pip installs only the local wheel: the test needs no network.
           "PIP_NO_INDEX": "1"}
    result = await asyncio.to_thread(
        CliRunner().invoke, cli, ["--json", *args], env=env
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def agent_source(tmp: Path, agent: str, wheel: Path) -> Path:
    files = agent_files(agent, AGENT)
    files["agent.toml"] = f'dependencies = ["tinydep @ {wheel.as_uri()}"]\n' + files["agent.toml"]
    return write_bundle(tmp / "source", files)


async def downloaded(mesh: Mesh, version: str) -> list[str]:
    parts = [m.chunk async for m in mesh.registry.DownloadVersion(
        reg.DownloadVersionRequest(name=version), metadata=mesh.me)]
    with tarfile.open(fileobj=io.BytesIO(b"".join(parts))) as tar:
        return tar.getnames()


async def test_dependencies_travel_in_the_bundle_and_the_agent_imports_them(
    mesh: Mesh,
) -> None:
    code = 'GREETING = "hello from tinydep"\ndef main(): pass\n'
    wheel = build_wheel(mesh.tmp / "wheel", "tinydep", code)
    agent = f"dep-{uuid.uuid4().hex[:8]}"
    source = agent_source(mesh.tmp, agent, wheel)

    first = await corral(mesh, "publish", str(source))
    assert first["name"] == f"agents/{agent}/versions/1"
    names = await downloaded(mesh, first["name"])
    assert "deps/tinydep/__init__.py" in names and "agent.py" in names
    volatile = ("/RECORD", "/INSTALLER", "/direct_url.json")
    assert not any(n.endswith(volatile) or n.startswith("deps/bin") for n in names)
    assert not (source / "deps").exists()  # staged in a copy, never in the user's directory

    # Vendored the same way again, the bundle is byte for byte the same: the same version.
    again = await corral(mesh, "publish", str(source))
    assert (again["name"], again["digest"]) == (first["name"], first["digest"])

    response = await mesh.router.Invoke(
        rt.InvokeRequest(agent=f"agents/{agent}", payload=b"{}"), metadata=mesh.me
    )
    output = response.output.decode()
    assert output.startswith("hello from tinydep from ") and "/deps/tinydep/" in output, output


# -- size limits ------------------------------------------------------------------------------


# The async stub type exists only in the .pyi stubs, hence the string.
SmallRegistry = tuple["registry_pb2_grpc.RegistryServiceAsyncStub", BundleLimits]
ALICE = who(tenant="")  # the default tenant


@pytest_asyncio.fixture
async def small_registry(start_services: StartServices) -> AsyncIterator[SmallRegistry]:
    """The real registry domain (on PostgreSQL) behind a servicer given small limits."""
    hosts = await start_services("registry")
    limits = BundleLimits(packed_bytes=64 * 1024, unpacked_bytes=16 * 1024)
    # Authenticated as the registry's own host authenticates (the tests' JWT issuer).
    settings = hosts["registry"].settings
    tokens = OidcVerifier(settings.oidc_issuers)
    authenticator = Authenticator(
        AssertionVerifier(load_identity(settings.pki_dir, "registry").ca), tokens=tokens)
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor("registry"), AuthInterceptor(authenticator)])
    registry = hosts["registry"].service.registry  # type: ignore[attr-defined]
    lifecycle = hosts["registry"].service.lifecycle  # type: ignore[attr-defined]
    servicer = RegistryServicer(registry, lifecycle, limits)
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with public_channel(f"127.0.0.1:{port}") as channel:
        yield registry_pb2_grpc.RegistryServiceStub(channel), limits
    await server.stop(grace=0.5)
    await tokens.aclose()


def too_large(err: grpc.aio.AioRpcError) -> str:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{err.code()}: {err.details()}"
    info, fields = error_details(err)
    assert info.reason == "BUNDLE_TOO_LARGE" and fields == ["chunk"]
    return err.details() or ""


async def test_the_registry_stops_reading_an_upload_once_it_passes_the_packed_limit(
    small_registry: SmallRegistry,
) -> None:
    stub, _ = small_registry
    sent = 0

    def upload() -> Iterator[reg.PublishVersionRequest]:
        # 100 MB announced; the registry must give up long before it has it all.
        nonlocal sent
        header = reg.PublishVersionHeader(size_bytes=100 * 1024 * 1024)
        yield reg.PublishVersionRequest(header=header)
        for _ in range(1600):
            sent += 1
            yield reg.PublishVersionRequest(chunk=b"\0" * 64 * 1024)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.PublishVersion(upload(), metadata=ALICE)  # type: ignore[arg-type]
    details = too_large(info.value)
    assert "bundle is over 65,536 bytes packed" in details
    assert "the limit is 65,536 bytes packed" in details
    assert sent < 1600


async def test_the_registry_refuses_a_bundle_that_unpacks_too_large(
    small_registry: SmallRegistry, tmp_path: Path
) -> None:
    stub, limits = small_registry
    files = agent_files(f"big-{uuid.uuid4().hex[:8]}", "app = None\n")
    data = pack(write_bundle(tmp_path / "big", {**files, "blob.bin": b"x" * 20_000}))
    assert len(data) < limits.packed_bytes and unpacked_size(data) > limits.unpacked_bytes
    with pytest.raises(grpc.aio.AioRpcError) as info:
        requests = iter(publish_requests(data))
        await stub.PublishVersion(requests, metadata=ALICE)  # type: ignore[arg-type]
    details = too_large(info.value)
    assert f"{unpacked_size(data):,} bytes unpacked" in details
    assert "the limit is 65,536 bytes packed and 16,384 bytes unpacked" in details
