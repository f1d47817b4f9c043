"""The platform a benchmark starts for itself, as `make run` would but out of the way: every
service on a port the OS picks, no HTTP ports, quiet logs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from services.common.settings import SERVICES
from services.launcher.__main__ import HTTP_PORTS, Launcher


def launcher(base: Mapping[str, str], data: Path, **env: str) -> Launcher:
    """A launcher for the environment `base` (its CORRAL_DATABASE_URL and CORRAL_REDIS_URL name
    the servers to use; without them embedded ones start) with data in `data` and `env` on top.
    Its services inherit that environment; `client_environ()` reaches them once started."""
    return Launcher({
        **base,
        **{f"CORRAL_{svc.upper()}_ADDR": "127.0.0.1:0" for svc in SERVICES},
        **dict.fromkeys(HTTP_PORTS, "0"),
        "CORRAL_DATA_DIR": str(data),
        "CORRAL_LOG_LEVEL": "WARNING",
        **env,
    })
