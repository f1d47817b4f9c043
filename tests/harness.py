"""Shared test helpers: real databases, in-process services on ports the OS picks, and sandboxes
started directly under a driver."""

from __future__ import annotations

import asyncio
import functools
import importlib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from services.common.auth.pki import ensure_pki
from services.common.server import ServiceHost
from services.common.settings import SERVICES, START_ORDER, Settings
from services.executor.drivers import cgroups
from services.executor.drivers.base import SandboxDriver, SandboxSpec
from services.executor.sandbox import Sandbox
from services.launcher.ports import HeldPort
from tests import credentials


@contextmanager
def scratch_database(server_url: str, prefix: str) -> Iterator[str]:
    """Creates a uniquely named database on the server at `server_url`, yields its URL, drops it."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path="/" + name))
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def refused_address() -> str:
    """host:port where every connection is refused, for the whole run: a port held bound and never
    listened on (see HeldPort), so no server can appear there."""
    return _refusing_port().address


@functools.cache  # one for the run: cached, its socket stays open until the run ends
def _refusing_port() -> HeldPort:
    return HeldPort()


def held_port() -> HeldPort:
    """A port for a server that a service starts on the port number it is given (the executor's
    HTTP port), which takes it over while it is held; close it when the test ends."""
    return HeldPort(handover=True)


def make_settings(database_url: str, redis_url: str, data_dir: Path, **env: str) -> Settings:
    """Settings for one test run: every service on port 0 (a Platform gives each the addresses
    of those started before it), a private Redis key prefix."""
    values = {
        "CORRAL_DATABASE_URL": database_url,
        "CORRAL_REDIS_URL": redis_url,
        "CORRAL_DATA_DIR": str(data_dir),
        "CORRAL_REDIS_PREFIX": f"corral-test-{uuid.uuid4().hex[:8]}:",
        "CORRAL_TRACING": "false",
        "CORRAL_TELEMETRY_METRICS_PORT": "0",
        "CORRAL_REGISTRY_METRICS_PORT": "0",
        "CORRAL_ROUTER_METRICS_PORT": "0",
        "CORRAL_SESSIONS_METRICS_PORT": "0",
        "CORRAL_OTLP_HTTP_PORT": "0",
        "CORRAL_EXECUTOR_HTTP_PORT": "0",
        # The run shares one database: a warm pool would warm every test's routed versions.
        "CORRAL_WARM_POOL_SIZE": "0",
        # The tests' tool services listen on 127.0.0.1.
        "CORRAL_TOOLS_ALLOW_LOOPBACK": "true",
        # A test that starts no executor still publishes (unchecked); with one, the check runs.
        "CORRAL_START_CHECK": "if_reachable",
    }
    for svc in SERVICES:
        values[f"CORRAL_{svc.upper()}_ADDR"] = "127.0.0.1:0"
        values[f"CORRAL_{svc.upper()}_INTERNAL_ADDR"] = "127.0.0.1:0"
    values["CORRAL_PKI_DIR"] = str(service_pki())
    values["CORRAL_OIDC_ISSUERS"] = credentials.issuers_setting()
    values.update(env)
    return Settings.from_env(values)


@functools.cache  # one for the run
def service_pki() -> Path:
    """A service CA and every service's certificate, made once for the run."""
    directory = Path(tempfile.mkdtemp(prefix="corral-test-pki-")) / "pki"
    ensure_pki(directory, SERVICES)
    return directory


async def start_service(
    name: str, settings: Settings, listen: str | None = None, internal_listen: str | None = None
) -> ServiceHost:
    """One service in-process on `listen` (by default where `settings` say: port 0 from
    make_settings); `host.address` is where it serves, `host.internal_address` where the other
    services reach it."""
    app = importlib.import_module(f"services.{name}.app")
    host = ServiceHost(name, settings, app.build(settings.for_service(name)))
    await host.start(listen, internal_listen)
    return host


async def restart(host: ServiceHost) -> ServiceHost:
    """A new instance of a stopped service where the old one listened: clients' channels to it
    reach the new one."""
    return await start_service(host.name, host.settings, host.listening, host.internal_listening)


class Platform:
    """Services started in-process, each on a port the OS picks. A port asked for as 0 is picked
    and held up front (as the launcher does), so every service knows every other's address
    whatever the order they start in: sessions and telemetry, which start before the registry,
    ask it to verify API keys and pins."""

    def __init__(self, settings: Settings) -> None:
        self._held: dict[str, list[HeldPort]] = {}
        for svc in SERVICES:
            ports = []
            addresses = []
            for address in (settings.addrs[svc], settings.internal_addrs[svc]):
                host, _, port = address.rpartition(":")
                if port == "0" and host == "127.0.0.1":
                    held = HeldPort(host, handover=True)
                    ports.append(held)
                    address = held.address
                addresses.append(address)
            if ports:
                self._held[svc] = ports
                settings = settings.with_address(svc, *addresses)
                settings = replace(
                    settings, listen={**settings.listen, svc: addresses[0]},
                    internal_listen={**settings.internal_listen, svc: addresses[1]},
                )
        self.settings = settings
        self.hosts: dict[str, ServiceHost] = {}

    async def start(self, *names: str) -> dict[str, ServiceHost]:
        """Starts `names` in dependency order (a service knows only those started before it) and
        returns every host started so far. A service started before, and stopped since, comes
        back where it was."""
        for name in sorted(names, key=START_ORDER.index):
            before = self.hosts.get(name)
            host = await start_service(
                name, self.settings, before.listening if before else None,
                before.internal_listening if before else None,
            )
            self.hosts[name] = host
            self.settings = self.settings.with_address(name, host.address, host.internal_address)
            for held in self._held.pop(name, ()):
                held.close()  # the service has the port now
            # A further replica started on these settings gets ports of its own.
            self.settings = replace(
                self.settings, listen={**self.settings.listen, name: "127.0.0.1:0"},
                internal_listen={**self.settings.internal_listen, name: "127.0.0.1:0"},
            )
        await self.fleet_seen()
        return self.hosts

    async def fleet_seen(self) -> None:
        """Waits (bounded) until the router's fleet view has every executor started here: their
        first heartbeats are on their way when they start."""
        router = self.hosts.get("router")
        executors = sum(1 for key in self.hosts if key.startswith("executor"))
        if router is None or not executors or router.service.router is None:  # type: ignore[attr-defined]
            return
        view = router.service.router.placement.fleet  # type: ignore[attr-defined]
        async with asyncio.timeout(10):
            while len(view.members()) < executors:
                await view.refresh()
                await asyncio.sleep(0.05)

    async def start_executor(self, name: str) -> ServiceHost:
        """Another executor of the fleet, named `name`, with a data dir of its own, on ports the
        OS picks; it joins the fleet with its first heartbeat. `hosts[f"executor {name}"]`."""
        executor = replace(self.settings.executor, name=name)
        settings = replace(
            self.settings, executor=executor, data_dir=self.settings.data_dir / f"executor-{name}",
            listen={**self.settings.listen, "executor": "127.0.0.1:0"},
            internal_listen={**self.settings.internal_listen, "executor": "127.0.0.1:0"},
        )
        host = await start_service("executor", settings)
        self.hosts[f"executor {name}"] = host
        await self.fleet_seen()
        return host

    async def stop(self, grace: float = 0.5) -> None:
        for ports in self._held.values():
            for held in ports:
                held.close()
        self._held.clear()
        await stop_mesh(self.hosts, grace)


def with_tracing(settings: Settings) -> Settings:
    return replace(settings, tracing=True)


class Server(Protocol):
    """A server started for the run (embedded PostgreSQL or Redis)."""

    url: str

    def stop(self) -> None: ...


@contextmanager
def machine_or_embedded(variable: str, start: Callable[[], Server]) -> Iterator[str]:
    """The URL of the machine's server when the environment `variable` names one, else of one
    `start` starts for the run (stopped at its end)."""
    url = os.environ.get(variable)
    if url:
        yield url
        return
    server = start()
    try:
        yield server.url
    finally:
        server.stop()


# All five, in the order they start: each one's dependencies are up before it.
MESH = START_ORDER


async def start_mesh(settings: Settings, *names: str) -> Platform:
    """`names` (all five when none are named) in-process on ports the OS picks; those started
    are stopped again if one fails to start."""
    platform = Platform(settings)
    try:
        await platform.start(*(names or MESH))
    except BaseException:
        await platform.stop()
        raise
    return platform


async def stop_mesh(hosts: Mapping[str, ServiceHost], grace: float = 0.5) -> None:
    """Stops hosts last started, first stopped."""
    for host in reversed(list(hosts.values())):
        await host.stop(grace=grace)


class Sandboxes:
    """Sandboxes started directly under one driver (no executor), each in a work dir of its own
    under `workdirs`; the fixture that made them stops them all when its test ends."""

    def __init__(self, driver: SandboxDriver, workdirs: Path) -> None:
        self.driver = driver
        self.workdirs = workdirs
        self.started: list[Sandbox] = []

    def spec(self, bundle: Path, entrypoint: str, *, agent: str, version: str) -> SandboxSpec:
        """What runs `bundle` for a session of its own, with this interpreter."""
        return SandboxSpec(
            session=f"sessions/{agent}-{uuid.uuid4().hex[:8]}", version=version,
            bundle_dir=bundle, workdir=self.workdirs / f"work-{uuid.uuid4().hex[:6]}",
            entrypoint=entrypoint, prompt_file="", python="",
        )

    async def start(self, spec: SandboxSpec) -> Sandbox:
        sandbox = Sandbox(spec)
        self.started.append(sandbox)
        await sandbox.start(self.driver)
        return sandbox

    async def stop(self) -> None:
        for sandbox in self.started:
            await sandbox.stop()


def writable_cgroups() -> cgroups.Hierarchy | None:
    """This machine's cgroup hierarchy when sandboxes' limits can be enforced here (memory, pids
    and cpu controllers writable: root), else None."""
    try:
        h = cgroups.detect()
    except (cgroups.CgroupsUnavailable, OSError):
        return None
    return h if all(os.access(d, os.W_OK) for d in h.directories()) else None
