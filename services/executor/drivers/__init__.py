"""Sandbox drivers: how a worker process is started. One driver per file, chosen by settings."""

from __future__ import annotations

from services.executor.drivers.base import SandboxDriver, SandboxSpec, WorkerProcess
from services.executor.drivers.process import ProcessDriver

__all__ = ["ProcessDriver", "SandboxDriver", "SandboxSpec", "WorkerProcess", "driver_for"]


def driver_for(name: str) -> SandboxDriver:
    if name == "process":
        return ProcessDriver()
    raise ValueError(f"unknown sandbox driver {name!r} (available: process)")
