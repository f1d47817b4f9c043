"""The contract every sandbox driver meets."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# The worker module each agent protocol runs (agent.toml's `protocol`), for every driver.
WORKERS = {"corral": "corral.sdk._runtime", "http": "corral.sdk._http_runtime"}


def worker_module(protocol: str) -> str:
    try:
        return WORKERS[protocol]
    except KeyError:
        raise ValueError(
            f"no sandbox worker for protocol {protocol!r} (one of {', '.join(WORKERS)})"
        ) from None


@dataclass(frozen=True)
class SandboxSpec:
    """What to run: the worker for one session of one version."""

    session: str
    version: str
    bundle_dir: Path
    workdir: Path
    entrypoint: str
    prompt_file: str
    python: str
    # OpenTelemetry resource attributes for the agent's own spans.
    resource: dict[str, str] = field(default_factory=dict)
    memory_mb: int = 512
    cpu_seconds: int = 60
    # "corral" (the SDK's worker) or "http" (an AgentCore-contract server behind a bridge).
    protocol: str = "corral"
    # The bundle's digest: what a warm sandbox is matched on, and what its manifest is cached by.
    digest: str = ""


class Limit(enum.StrEnum):
    """A resource limit that ended a worker."""

    MEMORY = "memory"
    CPU = "cpu"


@dataclass(frozen=True)
class Usage:
    """What a worker's processes use now; zeros where the driver does not measure."""

    memory_bytes: int = 0
    cpu_seconds: float = 0.0


class WorkerProcess(Protocol):
    pid: int

    async def wait(self) -> int: ...

    def kill(self) -> None: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def limit_hit(self) -> Limit | None:
        """Which limit ended the worker, once wait() has returned; None when none did (or the
        driver enforces none)."""
        ...

    def usage(self) -> Usage:
        """Memory and CPU time in use; zeros once the worker has ended."""
        ...


class SandboxDriver(Protocol):
    @property
    def name(self) -> str: ...

    async def spawn(self, spec: SandboxSpec, socket_fd: int) -> WorkerProcess:
        """Starts the worker with `socket_fd` (its end of a Unix socketpair) inherited."""
        ...

    def remove_orphans(self) -> int:
        """Removes what executors that crashed on this host left behind (their sandboxes'
        cgroups, runtime state); returns how many sandboxes' remains it removed."""
        ...
