"""Files only their owner may read (signing keys, the bootstrap administrator's API key), written
so that a reader sees the old file or the new one, never a part, and a crash keeps one of them."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_private_file(path: Path, data: bytes) -> None:
    """Writes `data` to `path` atomically, never readable by anyone but the owner."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
