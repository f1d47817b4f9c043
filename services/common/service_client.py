"""What every client of another Corral service holds: one channel to that service, a typed stub on
it, and close(). The clients modules subclass it, one class per service they call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import grpc

from services.common.clients import channel
from services.common.settings import Settings

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
