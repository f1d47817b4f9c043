"""The platform a benchmark starts for itself, as `make run` would but out of the way: every
service on a port the OS picks, no HTTP ports, quiet logs, the service certificates and the
platform administrator's API key under the benchmark's own data directory."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

from corral.config import ADMIN_KEY_FILE
from services.common.settings import SERVICES
from services.launcher.__main__ import HTTP_PORTS, Launcher
from tests.harness import scratch_database


def launcher(base: Mapping[str, str], data: Path, **env: str) -> Launcher:
    """A launcher for the environment `base` (its CORRAL_DATABASE_URL and CORRAL_REDIS_URL name
    the servers to use; without them embedded ones start) with data in `data` and `env` on top.
    Its services inherit that environment; `client_environ()` reaches them once started."""
    return Launcher({
        **{k: v for k, v in base.items() if k not in ("CORRAL_API_KEY", "CORRAL_TOKEN")},
        **{f"CORRAL_{svc.upper()}_ADDR": "127.0.0.1:0" for svc in SERVICES},
        **dict.fromkeys(HTTP_PORTS, "0"),
        "CORRAL_DATA_DIR": str(data),
        "CORRAL_LOG_LEVEL": "WARNING",
        **env,
    })


def start_storage(launcher: Launcher) -> None:
    """PostgreSQL and Redis, and the service CA and certificates, as `make run` makes them."""
    launcher.start_storage()
    launcher.ensure_certificates()


def admin_key(launcher: Launcher) -> str:
    """The platform administrator's API key the registry bootstrapped (once it has started)."""
    return (launcher.settings.data_dir / ADMIN_KEY_FILE).read_text().strip()


def client_environ(launcher: Launcher) -> dict[str, str]:
    """What points a client at the started platform, with the administrator's key."""
    return {**launcher.client_environ(), "CORRAL_API_KEY": admin_key(launcher)}


def own_database(base: Mapping[str, str], stack: ExitStack) -> dict[str, str]:
    """When `base` names a PostgreSQL server, a scratch database on it for the benchmark's
    platform (dropped when `stack` closes): a registry starting with a new data directory makes a
    new bootstrap administrator key and revokes the one a platform on that database had."""
    if not base.get("CORRAL_DATABASE_URL"):
        return {}
    return {"CORRAL_DATABASE_URL": stack.enter_context(
        scratch_database(base["CORRAL_DATABASE_URL"], "corral_bench"))}
