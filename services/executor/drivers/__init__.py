"""Sandbox drivers: how a worker process is started. One driver per file, chosen by settings."""

from __future__ import annotations

import logging
import shutil
import sys

from services.executor.drivers.base import SandboxDriver, SandboxSpec, WorkerProcess
from services.executor.drivers.process import ProcessDriver

__all__ = ["ProcessDriver", "SandboxDriver", "SandboxSpec", "WorkerProcess", "driver_for"]
log = logging.getLogger(__name__)
DRIVERS = ("bwrap", "gvisor", "process")


def driver_for(name: str) -> SandboxDriver:
    """The named driver; with no name, bwrap where bubblewrap is installed on Linux, else the
    process driver, which says loudly that it does not isolate. gvisor only when asked for by
    name: it fails here, saying how to install runsc, rather than falling back."""
    chosen = name or ("bwrap" if sys.platform == "linux" and shutil.which("bwrap") else "process")
    if chosen == "bwrap":
        from services.executor.drivers.bwrap import BwrapDriver, RuntimeMissing, SandboxUnavailable

        try:
            return BwrapDriver()
        except SandboxUnavailable as exc:
            # Asked for by name, or only the agents' runtime missing (a set-up step to run, not a
            # reason to give up isolation): refuse to start, saying how to fix it.
            if name or isinstance(exc, RuntimeMissing):
                raise
            log.warning("the bwrap sandbox driver is not usable here: %s", exc)
            chosen = "process"
    if chosen == "gvisor":
        from services.executor.drivers.gvisor import GvisorDriver

        return GvisorDriver()
    if chosen == "process":
        log.warning(
            "SANDBOX DRIVER 'process' DOES NOT ISOLATE: agent code runs as an ordinary process "
            "with this machine's file system and network. Install bubblewrap "
            "(scripts/setup-sandbox.sh) for the bwrap driver."
        )
        return ProcessDriver()
    raise ValueError(f"unknown sandbox driver {chosen!r} (CORRAL_SANDBOX_DRIVER: one of {', '.join(DRIVERS)})")
