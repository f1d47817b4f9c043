"""Channels to other Corral services, and the base of every clients module's classes: one channel
to the service it calls (its internal listener, over mutual TLS with this service's certificate),
a typed stub, the metadata that says on whose behalf a call is made, close()."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Generic, TypeVar

import grpc

from services.common import addresses, identity, tracing
from services.common.auth.assertions import ASSERTION_KEY, AssertionSigner
from services.common.auth.interceptor import TENANT_KEY
from services.common.auth.pki import ServiceIdentity, load_identity
from services.common.auth.principal import Principal
from services.common.settings import Settings

Metadata = tuple[tuple[str, str], ...]
# The largest message a service takes or sends, on its own server (services/common/server.py)
# and on its channels to the others.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def service_identity(settings: Settings) -> ServiceIdentity:
    """The identity of the service these settings were given to."""
    if not settings.service:
        raise RuntimeError("service-to-service calls need settings given to a service (for_service)")
    return load_identity(settings.pki_dir, settings.service)


@functools.cache
def _signer(identity: ServiceIdentity) -> AssertionSigner:
    return AssertionSigner(identity)


# How long a channel waits at most between attempts to reconnect to a service that went away
# (gRPC's default is 120 s): a restarted service is called again within about this long.
MAX_RECONNECT_BACKOFF_S = 1.0


def channel(
    settings: Settings, service: str, max_reconnect_backoff_s: float = MAX_RECONNECT_BACKOFF_S
) -> grpc.aio.Channel:
    """A channel to `service`'s internal listener, or to each of its replicas in turn
    (services/common/addresses.py). `max_reconnect_backoff_s`: the longest wait between attempts
    to reconnect to a service that went away."""
    return channel_to(settings, settings.internal_addrs[service], service, max_reconnect_backoff_s)


def channel_to(
    settings: Settings, address: str, service: str,
    max_reconnect_backoff_s: float = MAX_RECONNECT_BACKOFF_S,
) -> grpc.aio.Channel:
    """A channel to `service`'s internal listener at `address` (also a member of the executor
    fleet, found by its heartbeat rather than in the settings)."""
    interceptors = list(tracing.client_interceptors()) if settings.tracing and settings.rpc_spans else []
    target, balancing = addresses.grpc_target(address, service)
    reconnect = [("grpc.max_reconnect_backoff_ms", int(max_reconnect_backoff_s * 1000))]
    return grpc.aio.secure_channel(
        target,
        service_identity(settings).channel_credentials(),
        interceptors=interceptors or None,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.enable_retries", 1),
            *balancing,
            *reconnect,
        ],
    )


def acting_in(tenant: str = "") -> Metadata:
    """Metadata of a call a service makes as itself: for every tenant (where the method allows
    it), or acting in `tenant`; with the current trace context. Who the service is, its
    certificate proves."""
    return (*(((TENANT_KEY, tenant),) if tenant else ()), *tracing.inject_metadata())


def on_behalf_of(settings: Settings, principal: Principal | None) -> Metadata:
    """Metadata that says a call is made for `principal` (None: the calling service itself). A
    user's principal goes as an assertion: the one it arrived with when relaying the call being
    handled, else one this service signs. A service names the tenant it acts in, if any."""
    if principal is None:
        return ()
    if principal.is_service:
        return ((TENANT_KEY, principal.tenant),) if principal.tenant else ()
    current = identity.current()
    if current is not None and current.assertion and current.principal == principal:
        return ((ASSERTION_KEY, current.assertion),)
    return ((ASSERTION_KEY, _signer(service_identity(settings)).sign(principal)),)


Stub = TypeVar("Stub")


class ServiceClient(Generic[Stub]):
    """Subclasses name their stub type in quotes: the generated *AsyncStub classes exist only in
    the .pyi stubs, for the type checker."""

    def __init__(
        self, settings: Settings, service: str, stub: Callable[[grpc.aio.Channel], Stub]
    ) -> None:
        self._settings = settings
        self._channel = channel(settings, service)
        self._stub = stub(self._channel)

    def metadata(self, principal: Principal | None = None) -> Metadata:
        """What says on whose behalf a call is made (`principal`, or this service itself), and
        the current trace context."""
        return (*on_behalf_of(self._settings, principal), *tracing.inject_metadata())

    async def close(self) -> None:
        await self._channel.close()


# A channel of a member that left the fleet lets the calls it carries finish (or fail on their
# own) for this long before they are cancelled: closing it at once would cancel them, and a
# cancelled call is no answer to give its caller.
RETIRED_GRACE_S = 3600.0


class ChannelPool(Generic[Stub]):
    """A channel and stub per address, for services reached at addresses that come and go (the
    executor fleet): `forget` retires one whose member left, `close` all."""

    def __init__(
        self, settings: Settings, service: str, stub: Callable[[grpc.aio.Channel], Stub]
    ) -> None:
        self._settings = settings
        self._service = service
        self._make_stub = stub
        self._open: dict[str, tuple[grpc.aio.Channel, Stub]] = {}
        # Channels of members that left, each closing with grace in a task of its own.
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}

    def stub(self, address: str) -> Stub:
        found = self._open.get(address)
        if found is None:
            opened = channel_to(self._settings, address, self._service)
            found = self._open[address] = (opened, self._make_stub(opened))
        return found[1]

    def addresses(self) -> set[str]:
        return set(self._open)

    async def forget(self, address: str) -> None:
        """New calls to `address` get a new channel; calls under way on the old one go on."""
        found = self._open.pop(address, None)
        if found is not None:
            task = asyncio.create_task(found[0].close(grace=RETIRED_GRACE_S))
            self._retiring[task] = found[0]
            task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def close(self) -> None:
        for task, channel in list(self._retiring.items()):
            task.cancel()
            await channel.close()
        for channel, _ in self._open.values():
            await channel.close()
        self._open.clear()
