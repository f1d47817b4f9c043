"""The contract every sandbox driver meets."""

from __future__ import annotations

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


class WorkerProcess(Protocol):
    pid: int

    async def wait(self) -> int: ...

    def kill(self) -> None: ...

    @property
    def returncode(self) -> int | None: ...


class SandboxDriver(Protocol):
    name: str

    async def spawn(self, spec: SandboxSpec, socket_fd: int) -> WorkerProcess:
        """Starts the worker with `socket_fd` (its end of a Unix socketpair) inherited."""
        ...
