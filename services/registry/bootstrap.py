"""The first credential of a new platform: a platform administrator's API key kept in a file that
only its owner can read (`make run` keeps it in .corral/admin.key, where the corral command finds
it). Checked at every start of the registry; remade when the file is missing or its key is not
valid any more (revoked, or from another database)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

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
    write_private(path, f"{minted}\n")
    log.info("wrote a new platform administrator's API key to %s (id %s)", path, minted.id)


def write_private(path: Path, text: str) -> None:
    """Replaces `path` with `text` at once (a reader sees the old file or the new one), readable
    by its owner only, in a directory only its owner can enter."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
