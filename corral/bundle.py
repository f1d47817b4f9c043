"""Bundles: a directory packed canonically into a tar and named by the sha256 of that tar,
checked on the way in (no path may escape the bundle) and unpacked safely."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from corral.manifest import Manifest, parse_manifest

MANIFEST = "agent.toml"
MAX_PACKED_BYTES = 250 * 1024 * 1024
MAX_UNPACKED_BYTES = 750 * 1024 * 1024
_SKIP_DIRS = {"__pycache__", ".git", ".venv", ".mypy_cache", ".pytest_cache"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


class BundleError(ValueError):
    """The bundle is unsafe or malformed; `path` names the entry at fault."""

    def __init__(self, path: str, description: str) -> None:
        super().__init__(f"{path}: {description}" if path else description)
        self.path = path
        self.description = description


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _entries(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        base = Path(dirpath)
        for d in dirnames:
            out.append(base / d)
        for f in sorted(filenames):
            if not f.endswith(_SKIP_SUFFIXES):
                out.append(base / f)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def pack(root: Path) -> bytes:
    """The canonical tar of a directory: sorted entries, zero mtimes and owners, fixed modes."""
    root = root.resolve()
    if not (root / MANIFEST).is_file():
        raise BundleError(MANIFEST, f"no {MANIFEST} in {root}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in _entries(root):
            rel = path.relative_to(root).as_posix()
            info = tarfile.TarInfo(rel)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
                _check_link(rel, target)
                info.type = tarfile.SYMTYPE
                info.linkname = target
                info.mode = 0o777
                tar.addfile(info)
            elif stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                info.size = st.st_size
                info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            else:
                raise BundleError(rel, "only files, directories and links may be in a bundle")
    return buf.getvalue()


def _check_path(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or name.startswith("/"):
        raise BundleError(name, "absolute paths are not allowed in a bundle")
    if ".." in p.parts:
        raise BundleError(name, "'..' is not allowed in bundle paths")
    return p


def _check_link(name: str, target: str) -> None:
    if target.startswith("/"):
        raise BundleError(name, f"link to absolute path {target!r} points outside the bundle")
    depth = len(PurePosixPath(name).parts) - 1
    for part in PurePosixPath(target).parts:
        depth = depth - 1 if part == ".." else depth + (part != ".")
        if depth < 0:
            raise BundleError(name, f"link to {target!r} points outside the bundle")


_MAX_LINK_HOPS = 40


def _check_link_chains(paths: set[str], links: dict[str, str]) -> None:
    """Each link checked alone can still escape through another (a -> ".", b -> "a/.."), so
    every link is resolved through the others, as the file system will. Entries beneath a link
    are refused (pack never makes them), which keeps archive paths equal to paths on disk."""
    for path in paths:
        parts = PurePosixPath(path).parts
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in links:
                raise BundleError(path, f"is beneath the link {prefix!r}; entries under a link are not allowed")
    for name, target in links.items():
        stack = list(PurePosixPath(name).parts[:-1])
        pending = list(PurePosixPath(target).parts)
        hops = 0
        while pending:
            part = pending.pop(0)
            if part == ".":
                continue
            if part == "..":
                if not stack:
                    raise BundleError(name, f"link to {target!r} points outside the bundle through other links")
                stack.pop()
                continue
            stack.append(part)
            via = links.get("/".join(stack))
            if via is not None:
                hops += 1
                if hops > _MAX_LINK_HOPS:
                    raise BundleError(name, f"link to {target!r} never resolves (a loop of links)")
                if via.startswith("/"):
                    raise BundleError(name, f"link to {target!r} points outside the bundle through other links")
                stack.pop()
                pending = list(PurePosixPath(via).parts) + pending


@dataclass(frozen=True)
class CheckedBundle:
    digest: str
    size: int
    manifest: Manifest
    manifest_text: str


def inspect(data: bytes) -> CheckedBundle:
    """Validates a bundle tar without unpacking it: safe paths, size limits, a valid agent.toml."""
    if len(data) > MAX_PACKED_BYTES:
        raise BundleError("", f"bundle is {len(data)} bytes packed; the limit is {MAX_PACKED_BYTES}")
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")  # noqa: SIM115 - read below, in memory
        members = tar.getmembers()
    except tarfile.TarError as exc:
        raise BundleError("", f"not a tar archive: {exc}") from None
    files: dict[str, tarfile.TarInfo] = {}
    links: dict[str, str] = {}
    seen: set[str] = set()
    total = 0
    for m in members:
        path = _check_path(m.name)
        # Paths compare normalised ("./agent.toml" is agent.toml), as they land on disk.
        key = path.as_posix()
        if key in seen:
            raise BundleError(m.name, "appears twice in the bundle")
        seen.add(key)
        if m.issym() or m.islnk():
            if m.islnk():
                raise BundleError(m.name, "hard links are not allowed in a bundle")
            _check_link(m.name, m.linkname)
            links[key] = m.linkname
        elif not (m.isfile() or m.isdir()):
            raise BundleError(m.name, "devices, fifos and other special files are not allowed")
        total += m.size
        if total > MAX_UNPACKED_BYTES:
            raise BundleError("", f"bundle unpacks to more than {MAX_UNPACKED_BYTES} bytes")
        if m.isfile():
            files[key] = m
    _check_link_chains(seen, links)
    if MANIFEST not in files:
        raise BundleError(MANIFEST, f"the bundle has no {MANIFEST} at its root")
    extracted = tar.extractfile(files[MANIFEST])
    assert extracted is not None
    text = extracted.read().decode("utf-8", errors="replace")
    manifest = parse_manifest(text, has_file=lambda p: p in files)
    return CheckedBundle(digest=digest_of(data), size=len(data), manifest=manifest, manifest_text=text)


def unpack(data: bytes, dest: Path) -> None:
    """Unpacks a bundle (already checked by `inspect`) with tarfile's 'data' filter as a second
    guard against paths and links escaping `dest`."""
    inspect(data)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        tar.extractall(dest, filter="data")
