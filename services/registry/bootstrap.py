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
    # A directory made here is its owner's alone. One that exists is left as it is: under
    # `make run` it is the data dir, which the embedded PostgreSQL's own user must traverse; the
    # key file itself is 0600.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private_file(path, f"{minted}\n".encode())
    log.info("wrote a new platform administrator's API key to %s (id %s)", path, minted.id)
