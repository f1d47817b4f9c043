"""Channels to other Corral services, with identity and trace context carried along, and the base
of every clients module's classes: one channel to the service it calls, a typed stub, close()."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import grpc

from services.common import tracing
from services.common.identity import Caller, metadata_of
from services.common.server import MAX_MESSAGE_BYTES
from services.common.settings import Settings


def channel(settings: Settings, service: str) -> grpc.aio.Channel:
    interceptors = list(tracing.client_interceptors()) if settings.tracing and settings.rpc_spans else []
    return grpc.aio.insecure_channel(
        settings.addrs[service],
        interceptors=interceptors or None,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.enable_retries", 1),
        ],
    )


def call_metadata(caller: Caller | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata for a call made on behalf of `caller`, with the current trace context."""
    return (*(metadata_of(caller) if caller else ()), *tracing.inject_metadata())


Stub = TypeVar("Stub")


class ServiceClient(Generic[Stub]):
    """Subclasses name their stub type in quotes: the generated *AsyncStub classes exist only in
    the .pyi stubs, for the type checker."""

    def __init__(
        self, settings: Settings, service: str, stub: Callable[[grpc.aio.Channel], Stub]
    ) -> None:
        self._channel = channel(settings, service)
        self._stub = stub(self._channel)

    async def close(self) -> None:
        await self._channel.close()
