"""Client-side configuration for the corral command and library, from the environment."""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ADDRS = {
    "router": "127.0.0.1:50051",
    "registry": "127.0.0.1:50052",
    "sessions": "127.0.0.1:50053",
    "executor": "127.0.0.1:50054",
    "telemetry": "127.0.0.1:50055",
}


@dataclass(frozen=True)
class ClientConfig:
    addrs: Mapping[str, str]
    tenant: str
    user: str
    # TLS to every address (a remote platform's edge), verified against this CA's PEM file, or
    # the system's roots when None. Set from a profile (corral.profiles).
    tls: bool = False
    ca_file: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: str | None) -> ClientConfig:
        env = os.environ if env is None else env
        addrs = {svc: env.get(f"CORRAL_{svc.upper()}_ADDR") or addr for svc, addr in DEFAULT_ADDRS.items()}
        try:
            default_user = getpass.getuser()
        except (KeyError, OSError):
            default_user = "anonymous"
        return cls(
            addrs=addrs,
            tenant=overrides.get("tenant") or env.get("CORRAL_TENANT") or "default",
            user=overrides.get("user") or env.get("CORRAL_USER") or default_user,
        )
