"""Client-side configuration for the corral command and library, from the environment."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ADDRS = {
    "router": "127.0.0.1:50051",
    "registry": "127.0.0.1:50052",
    "sessions": "127.0.0.1:50053",
    "executor": "127.0.0.1:50054",
    "telemetry": "127.0.0.1:50055",
}
# Where `make run` keeps its platform administrator's API key, under the data dir.
ADMIN_KEY_FILE = "admin.key"


class ConfigError(ValueError):
    """The client's configuration contradicts itself; the message says how to fix it."""


@dataclass(frozen=True)
class ClientConfig:
    addrs: Mapping[str, str]
    # Sent as `authorization: Bearer <credential>` on every call: an API key (crl_...) or a JWT.
    credential: str = field(default="", repr=False)
    # TLS to every address (a remote platform's edge), verified against this CA's PEM file, or
    # the system's roots when None. Set from a profile (corral.profiles).
    tls: bool = False
    ca_file: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: str | None) -> ClientConfig:
        """Overrides (api_key, token) win over the environment. Who calls, in which tenant, is
        what the credential proves (`corral whoami`). Without a
        credential, a platform on this machine is called with the administrator's key that
        `make run` keeps in <CORRAL_DATA_DIR, default .corral>/admin.key."""
        env = os.environ if env is None else env
        addrs = {svc: env.get(f"CORRAL_{svc.upper()}_ADDR") or addr for svc, addr in DEFAULT_ADDRS.items()}
        return cls(
            addrs=addrs,
            credential=_credential(env, overrides) or _local_admin_key(env, addrs),
        )


def _credential(env: Mapping[str, str], overrides: Mapping[str, str | None]) -> str:
    api_key, token = overrides.get("api_key") or "", overrides.get("token") or ""
    if not api_key and not token:
        api_key, token = env.get("CORRAL_API_KEY", ""), env.get("CORRAL_TOKEN", "")
    if api_key and token:
        raise ConfigError("give either an API key (--api-key, CORRAL_API_KEY) or a token "
                          "(--token, CORRAL_TOKEN), not both")
    return (api_key or token).strip()


def is_loopback(address: str) -> bool:
    """Whether host:port (or each of a comma-separated list of replicas) names this machine."""
    parts = [part.strip() for part in address.split(",") if part.strip()]
    if len(parts) > 1:
        return all(is_loopback(part) for part in parts)
    host = address.rpartition(":")[0].strip("[]") or address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _local_admin_key(env: Mapping[str, str], addrs: Mapping[str, str]) -> str:
    if not all(is_loopback(a) for a in addrs.values()):
        return ""
    path = Path(env.get("CORRAL_DATA_DIR") or ".corral") / ADMIN_KEY_FILE
    try:
        return path.read_text().strip()
    except OSError:  # none (no local platform), or not ours to read
        return ""
