"""Start-up and graceful shutdown of one gRPC service, with health, reflection and interceptors."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Protocol

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from corral.identity.v1 import identity_pb2, identity_pb2_grpc
from services.common import addresses, tracing
from services.common.admission import ConcurrencyLimitInterceptor
from services.common.auth.assertions import AssertionVerifier
from services.common.auth.interceptor import Authenticator, AuthInterceptor
from services.common.auth.methods import METHODS
from services.common.auth.oidc import OidcVerifier
from services.common.auth.pki import load_identity
from services.common.auth.verify import CredentialVerifier
from services.common.auth.whoami import WhoAmIServicer
from services.common.clients import MAX_MESSAGE_BYTES
from services.common.decoding import RequestDecodingInterceptor
from services.common.interceptors import ErrorMappingInterceptor
from services.common.logs import setup_logging
from services.common.prometheus import MetricsExporter
from services.common.rpc_metrics import RpcMetricsInterceptor
from services.common.settings import Settings
from services.common.store_errors import store_error

log = logging.getLogger(__name__)

# Long enough for a streaming invocation to finish its current chunk; Ctrl-C should stay snappy.
SHUTDOWN_GRACE_S = 5.0


class Service(Protocol):
    """What a service hands the host: its servicers, and what to start and stop around them."""

    async def start(self, server: grpc.aio.Server, stack: AsyncExitStack) -> list[str]:
        """Registers servicers on `server`, pushes resources to close onto `stack`, and returns
        the full names of the gRPC services registered (for health and reflection)."""
        ...

    async def drain(self) -> None:
        """Ends long-lived streams (watches) so that shutdown does not wait on them. Services
        that subclass Service explicitly inherit this one, which has none to end."""
        return

    def key_verifier(self) -> CredentialVerifier | None:
        """How this service checks API keys: the registry, which keeps them, checks its own store;
        the others (None) ask the registry."""
        return None

    def authenticated_by(self, authenticator: Authenticator) -> None:
        """Told before start how the host checks credentials, for a service that also takes
        calls that are not gRPC (telemetry's OTLP over HTTP): they must be checked the same way."""
        return

    def serving(self, address: str, internal_address: str) -> None:
        """Told once the server listens, where (with port 0, the ports the OS picked): the
        executor heartbeats its address into the fleet from then on."""
        return

    def metrics_registry(self) -> CollectorRegistry | None:
        """Where the service's Prometheus metrics are; the host adds its RPC metrics and serves
        it on the service's metrics port (None: a registry of RPC metrics alone)."""
        return None


class App(Service):
    """The base of every service's app.py: the wiring of one service from its settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = CollectorRegistry()

    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics


IDENTITY_SERVICE = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name


def unlisted_methods(services: list[str]) -> list[str]:
    """The methods of `services` (full names) that the access table does not cover."""
    pool = descriptor_pool.Default()
    return [
        f"/{name}/{method.name}"
        for name in services
        for method in pool.FindServiceByName(name).methods
        if f"/{name}/{method.name}" not in METHODS
    ]


class ServiceHost:
    """One grpc.aio server: a service's handlers plus health, reflection and the error mapping."""

    def __init__(self, name: str, settings: Settings, service: Service) -> None:
        self.name = name
        self.settings = settings.for_service(name)
        self.service = service
        self.health = health.aio.HealthServicer()
        # The port bound, and host:port listened on: with port 0, the port the OS picked.
        self.port = 0
        self.listening = ""
        # The same for the internal listener (mutual TLS, for the other services).
        self.internal_port = 0
        self.internal_listening = ""
        self._stack = AsyncExitStack()
        self._server: grpc.aio.Server | None = None
        self._services: list[str] = []

    def _key_verifier(self) -> CredentialVerifier:
        """The service's own (the registry's), else the registry asked over the internal channel,
        its answers cached for settings.credential_cache_s (how long a revoked key still works)."""
        own = self.service.key_verifier()
        if own is not None:
            return own
        # Imported here: key_client is built on the clients module, which imports this one.
        from services.common.auth.key_client import CachedKeyVerifier, RemoteKeyVerifier

        remote = RemoteKeyVerifier(self.settings)
        self._stack.push_async_callback(remote.close)
        return CachedKeyVerifier(remote, self.settings.credential_cache_s)

    async def start(self, listen: str | None = None, internal_listen: str | None = None) -> int:
        """Starts serving and returns the bound port (useful with port 0 in tests)."""
        identity = load_identity(self.settings.pki_dir, self.name)
        issuers = self.settings.oidc_issuers
        tokens = OidcVerifier(issuers) if issuers else None
        if tokens is not None:
            self._stack.push_async_callback(tokens.aclose)
        authenticator = Authenticator(
            AssertionVerifier(identity.ca), api_keys=self._key_verifier(), tokens=tokens
        )
        self.service.authenticated_by(authenticator)
        # The error mapping wraps the authentication, so that its refusals get their codes; the
        # request bytes are judged only for a caller who may call.
        # The metrics outermost: the code they count is the one the caller gets.
        metrics = self.service.metrics_registry() or CollectorRegistry()
        interceptors: list[grpc.aio.ServerInterceptor] = [
            RpcMetricsInterceptor(metrics),
            ErrorMappingInterceptor(self.name, store_error),
            ConcurrencyLimitInterceptor(self.name, self.settings.max_concurrent_rpcs),
            AuthInterceptor(authenticator),
            RequestDecodingInterceptor(),
        ]
        if self.settings.tracing and self.settings.rpc_spans:
            interceptors.insert(1, tracing.server_interceptor())
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        self._server = server
        try:
            self._services = [*await self.service.start(server, self._stack), IDENTITY_SERVICE]
            identity_pb2_grpc.add_IdentityServiceServicer_to_server(WhoAmIServicer(), server)
            unlisted = unlisted_methods(self._services)
            if unlisted:
                raise RuntimeError(
                    f"{self.name} serves methods the access table (services/common/auth/"
                    f"methods.py) does not cover, so no one could be allowed or refused: {unlisted}"
                )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            reflection.enable_server_reflection(
                [*self._services, health.SERVICE_NAME, reflection.SERVICE_NAME], server
            )
            address = listen or self.settings.listen[self.name]
            self.port = server.add_insecure_port(address)
            if self.port == 0:
                raise OSError(f"{self.name} could not listen on {address}")
            self.listening = with_port(address, self.port)
            internal = internal_listen or self.settings.internal_listen[self.name]
            self.internal_port = server.add_secure_port(internal, identity.server_credentials())
            if self.internal_port == 0:
                raise OSError(f"{self.name} could not listen on {internal} (internal, mutual TLS)")
            self.internal_listening = with_port(internal, self.internal_port)
            await server.start()
            self.service.serving(self.address, self.internal_address)
            exporter = MetricsExporter(self.settings.metrics_ports.get(self.name, 0), metrics)
            exporter.start()
            self._stack.push_async_callback(exporter.stop)
        except BaseException:
            await self._stack.aclose()
            raise
        for svc in ("", *self._services):
            await self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    @property
    def address(self) -> str:
        """Where clients reach this server: its address in the settings (its listen address when
        the settings list replicas), on the port it bound."""
        return with_port(_own(self.settings.addrs[self.name], self.settings.listen[self.name]), self.port)

    @property
    def internal_address(self) -> str:
        """Where the other services reach it, with their certificates."""
        return with_port(
            _own(self.settings.internal_addrs[self.name], self.settings.internal_listen[self.name]),
            self.internal_port,
        )

    async def stop(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """NOT_SERVING first so balancers move away, then drain, then close resources."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self.service.drain()
        await self._server.stop(grace)
        self._server = None
        await self._stack.aclose()


async def serve_forever(host: ServiceHost) -> None:
    """Runs a service until SIGINT or SIGTERM, then shuts it down in order."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if not host.settings.supervised:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    port = await host.start()
    log.info("%s serving on %s (port %d; internal, mutual TLS: %s)",
             host.name, host.listening, port, host.internal_listening)
    if host.settings.address_file is not None:
        report_address(host.settings.address_file, host.address, host.internal_address)
    await stop.wait()
    log.info("%s shutting down", host.name)
    await host.stop()
    tracing.shutdown()


def with_port(address: str, port: int) -> str:
    """`host:port` with the port replaced (IPv6 hosts keep their brackets)."""
    return f"{address.rpartition(':')[0]}:{port}"


def report_address(path: Path, address: str, internal: str) -> None:
    """Tells the launcher where this service serves: its public address, then its internal one,
    on one line. Written aside, then renamed into place, so that the launcher, which polls for
    the file, never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_text(f"{address} {internal}\n")
    part.replace(path)


def main(name: str, build: Callable[[Settings], Service]) -> None:
    """Entry point shared by every service's __main__."""
    settings = Settings.from_env().for_service(name)
    setup_logging(name, settings.log_level)
    tracing.setup(name, settings)
    try:
        asyncio.run(serve_forever(ServiceHost(name, settings, build(settings))))
    except Exception as exc:  # noqa: BLE001 - a start-up failure gets one clear line, not a trace
        log.error("%s failed to start: %s", name, exc)
        raise SystemExit(1) from None


def _own(address: str, listen: str) -> str:
    """This replica's address: `address`, unless it lists several replicas (then `listen`)."""
    return address if len(addresses.replicas(address)) == 1 else listen
