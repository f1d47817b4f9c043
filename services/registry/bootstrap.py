"""The first credential of a new platform: a platform administrator's API key kept in a file that
only its owner can read (`make run` keeps it in .corral/admin.key, where the corral command finds
it). Checked at every start of the registry; remade when the file is missing or its key is not
valid any more (revoked, or from another database); written at once (services/common/files.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from services.common.files import write_private_file
from services.registry.keys import Keys

log = logging.getLogger(__name__)


async def ensure_admin_key(keys: Keys, path: Path) -> None:
    try:
        current = path.read_text().strip()
    except FileNotFoundError:
        current = ""
    minted = await keys.ensure_bootstrap(current)
    if minted is None:
        path.chmod(0o600)
        return
    # Only its owner may enter the directory (under `make run`, the data dir with the databases).
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    write_private_file(path, f"{minted}\n".encode())
    log.info("wrote a new platform administrator's API key to %s (id %s)", path, minted.id)
