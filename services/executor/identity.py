"""Who this executor is in the fleet: a stable name (CORRAL_EXECUTOR_NAME, else generated once as
`<host>-<6 hex>` and kept in the data dir, so a restart is the same executor and the same lease
holder) and an instance id new at every start of the process."""

from __future__ import annotations

import re
import secrets
import socket
from pathlib import Path

NAME_FILE = "executor-name"
_NOT_IN_NAME = re.compile(r"[^a-z0-9-]+")


def generated_name(hostname: str) -> str:
    host = _NOT_IN_NAME.sub("-", hostname.lower()).strip("-")[:60] or "executor"
    return f"{host}-{secrets.token_hex(3)}"


def executor_name(configured: str, data_dir: Path) -> str:
    """The configured name, else the one kept in `data_dir` (made and kept at the first start)."""
    if configured:
        return configured
    kept = data_dir / NAME_FILE
    try:
        name = kept.read_text().strip()
    except FileNotFoundError:
        name = ""
    if not name:
        name = generated_name(socket.gethostname())
        data_dir.mkdir(parents=True, exist_ok=True)
        part = kept.with_name(NAME_FILE + ".part")
        part.write_text(name + "\n")
        part.replace(kept)
    return name


def instance_id() -> str:
    return secrets.token_hex(8)
