"""Tools an agent may call, per tenant, as values: what a tool is, its record, an update."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from corral.names import ToolRef

ToolKind = Literal["http", "grpc"]


@dataclass(frozen=True)
class ToolSpec:
    """What a tool is, as written: everything but its secret, times and revision."""

    kind: ToolKind
    address: str
    timeout_ms: int
    description: str


@dataclass(frozen=True)
class ToolRecord:
    tenant: str
    id: str
    spec: ToolSpec
    # Sealed by services.registry.secrets; never leaves the registry except decrypted to the
    # executor through ResolveTool.
    secret_ciphertext: bytes | None = field(repr=False)
    revision: int
    create_time: datetime
    update_time: datetime

    @property
    def etag(self) -> str:
        return f'W/"{self.revision}"'

    @property
    def has_secret(self) -> bool:
        return self.secret_ciphertext is not None

    @property
    def ref(self) -> ToolRef:
        return ToolRef(self.id)


@dataclass(frozen=True)
class ToolDraft:
    """A tool as a request carries it, before the rules check it. `kind` is "http", "grpc", ""
    when unset, or whatever else the caller sent; `timeout_ns` is None when unset."""

    kind: str = ""
    address: str = ""
    timeout_ns: int | None = None
    description: str = ""
    secret: str = ""


@dataclass(frozen=True)
class ToolChange:
    """An update: None leaves a field as it is; secret "" removes the secret."""

    kind: ToolKind | None = None
    address: str | None = None
    timeout_ms: int | None = None
    description: str | None = None
    secret: str | None = None

    def changed(self) -> list[str]:
        return [
            name
            for name, value in (
                ("kind", self.kind), ("address", self.address), ("timeout_ms", self.timeout_ms),
                ("description", self.description), ("secret", self.secret),
            )
            if value is not None
        ]
