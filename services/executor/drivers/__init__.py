"""Sandbox drivers: how a worker process is started. One driver per file, chosen by settings."""

from __future__ import annotations

import logging
import shutil
import sys

from services.executor.drivers.base import SandboxDriver, SandboxSpec, WorkerProcess
from services.executor.drivers.process import ProcessDriver

__all__ = ["ProcessDriver", "SandboxDriver", "SandboxSpec", "WorkerProcess", "driver_for"]
log = logging.getLogger(__name__)
DRIVERS = ("bwrap", "process")


def driver_for(name: str) -> SandboxDriver:
    """The named driver; with no name, bwrap where bubblewrap is installed on Linux, else the
    process driver, which says loudly that it does not isolate."""
    if not name:
        name = "bwrap" if sys.platform == "linux" and shutil.which("bwrap") else "process"
    if name == "bwrap":
        from services.executor.drivers.bwrap import BwrapDriver

        return BwrapDriver()  # raises SandboxUnavailable with how to fix it
    if name == "process":
        log.warning(
            "SANDBOX DRIVER 'process' DOES NOT ISOLATE: agent code runs as an ordinary process "
            "with this machine's file system and network. Install bubblewrap "
            "(scripts/setup-sandbox.sh) for the bwrap driver."
        )
        return ProcessDriver()
    raise ValueError(f"unknown sandbox driver {name!r} (CORRAL_SANDBOX_DRIVER: one of {', '.join(DRIVERS)})")
