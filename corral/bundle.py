"""Bundles: a directory packed canonically into a tar and named by the sha256 of that tar,
checked on the way in (no path may escape the bundle, size limits) and unpacked safely; and the
staging step of publish that vendors an agent's dependencies into the bundle."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import packaging.tags

from corral.manifest import REQUIREMENTS_FILE, Manifest, declared_dependencies, parse_manifest

MANIFEST = "agent.toml"
MAX_PACKED_BYTES = 250 * 1024 * 1024
MAX_UNPACKED_BYTES = 750 * 1024 * 1024
# What a bundle leaves out of its directory: caches and tools' folders, compiled Python.
SKIPPED_DIRS = frozenset({"__pycache__", ".git", ".venv", ".mypy_cache", ".pytest_cache"})
SKIPPED_SUFFIXES = (".pyc", ".pyo")


class BundleError(ValueError):
    """The bundle is unsafe or malformed; `path` names the entry at fault."""

    def __init__(self, path: str, description: str) -> None:
        super().__init__(f"{path}: {description}" if path else description)
        self.path = path
        self.description = description


@dataclass(frozen=True)
class BundleLimits:
    """How large a bundle may be, packed (as uploaded) and unpacked (on the executor's disk).
    Tests pass small ones instead of writing 250 MB files."""

    packed_bytes: int = MAX_PACKED_BYTES
    unpacked_bytes: int = MAX_UNPACKED_BYTES


LIMITS = BundleLimits()


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):,.1f} MB" if n >= 10 * 1024 * 1024 else f"{n:,} bytes"


class BundleTooLarge(BundleError):
    """Over a size limit. `unpacked` is None when the packed size alone was enough to refuse:
    the registry stops reading an upload as soon as it passes the packed limit."""

    def __init__(self, packed: int, unpacked: int | None, limits: BundleLimits) -> None:
        if unpacked is None:
            size = f"over {_size(limits.packed_bytes)} packed ({packed:,} bytes received)"
        else:
            size = f"{_size(packed)} packed and {_size(unpacked)} unpacked"
        super().__init__(
            "",
            f"bundle is {size}; the limit is {_size(limits.packed_bytes)} packed and "
            f"{_size(limits.unpacked_bytes)} unpacked (leave out large files or dependencies)",
        )
        self.packed = packed
        self.unpacked = unpacked
        self.limits = limits


def check_size(packed: int, unpacked: int, limits: BundleLimits = LIMITS) -> None:
    if packed > limits.packed_bytes or unpacked > limits.unpacked_bytes:
        raise BundleTooLarge(packed, unpacked, limits)


def _unpacked_size(members: list[tarfile.TarInfo]) -> int:
    return sum(m.size for m in members if m.isfile())


def unpacked_size(data: bytes) -> int:
    """The bytes a bundle tar's files take once unpacked, summed from the member headers: no
    file content is read or written."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            return _unpacked_size(tar.getmembers())
    except tarfile.TarError as exc:
        raise BundleError("", f"not a tar archive: {exc}") from None


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _entries(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        base = Path(dirpath)
        for d in dirnames:
            out.append(base / d)
        for f in sorted(filenames):
            if not f.endswith(SKIPPED_SUFFIXES):
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


def inspect(data: bytes, limits: BundleLimits = LIMITS) -> CheckedBundle:
    """Validates a bundle tar without unpacking it: safe paths, size limits, a valid agent.toml."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")  # noqa: SIM115 - read below, in memory
        members = tar.getmembers()
    except tarfile.TarError as exc:
        raise BundleError("", f"not a tar archive: {exc}") from None
    check_size(len(data), _unpacked_size(members), limits)
    files: dict[str, tarfile.TarInfo] = {}
    links: dict[str, str] = {}
    seen: set[str] = set()
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


def unpack(data: bytes, dest: Path, limits: BundleLimits = LIMITS) -> None:
    """Unpacks a bundle (already checked by `inspect`) with tarfile's 'data' filter as a second
    guard against paths and links escaping `dest`. The size check reads only the tar's headers,
    so a bundle too large to unpack is refused before anything is written."""
    inspect(data, limits)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            _extract_as_data(tar, dest)


def _extract_as_data(tar: tarfile.TarFile, dest: Path) -> None:
    """What tarfile's 'data' filter (PEP 706) does, for a Python without it: Debian 12's 3.11.2,
    the container image's, predates it. On a tar `inspect` has passed (relative paths without
    '..', links that stay inside, only files, directories and symlinks), each member is written
    with no owner taken from the tar and no setuid, setgid, sticky or group/other write bit."""
    for member in tar.getmembers():
        target = dest / _check_path(member.name)
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            target.chmod(member.mode & 0o755 | 0o700)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if member.issym():
            target.symlink_to(member.linkname)
            continue
        source = tar.extractfile(member)
        assert source is not None
        # "x": never written through a file or link already there.
        with source, open(target, "xb") as out:
            shutil.copyfileobj(source, out)
        target.chmod(member.mode & 0o755 | 0o600)


# -- vendored dependencies ------------------------------------------------------------------
# A sandbox has no network, so what an agent imports travels inside its bundle: `corral publish`
# installs the declared dependencies into deps/ of a staging copy, and the digest covers them.

DEPS_DIR = "deps"
# What pip writes that is not the same from one install of the same wheels to the next (RECORD
# and direct_url.json hold paths and hashes of the install, INSTALLER names the tool) or that
# cannot run in a sandbox (bin/ scripts start with this machine's interpreter path).
_VOLATILE_DIST_INFO = ("RECORD", "INSTALLER", "direct_url.json")
_PIP_ERROR_LINES = 40


@dataclass(frozen=True)
class Target:
    """The interpreter and platform the executor runs agents on, which wheels must fit."""

    python_version: str  # "3.11"
    platforms: tuple[str, ...]  # pip --platform tags, most specific first

    @classmethod
    def current(cls) -> Target:
        """This interpreter's: in the default setup the executor runs on this machine."""
        platforms: list[str] = []
        for tag in packaging.tags.sys_tags():
            if tag.platform != "any" and tag.platform not in platforms:
                platforms.append(tag.platform)
        return cls(f"{sys.version_info.major}.{sys.version_info.minor}", tuple(platforms))

    @property
    def abi(self) -> str:
        return "cp" + self.python_version.replace(".", "")

    def describe(self) -> str:
        rest = len(self.platforms) - 1
        more = f" (+{rest} compatible platform tags)" if rest > 0 else ""
        return f"{self.abi} {self.platforms[0]}{more}"

    def pip_args(self) -> list[str]:
        # --only-binary: a source build would run on this machine and could fit it, not the target.
        args = ["--only-binary=:all:", "--python-version", self.python_version,
                "--implementation", "cp", "--abi", self.abi]
        for platform in self.platforms:
            args += ["--platform", platform]
        return args


def declared_requirements(source: Path) -> tuple[str, ...]:
    """The dependencies a source directory declares (agent.toml's `dependencies` or its
    requirements.txt), after checking agent.toml as the registry will."""
    toml = source / MANIFEST
    if not toml.is_file():
        raise BundleError(MANIFEST, f"no {MANIFEST} in {source}")
    manifest = parse_manifest(toml.read_text(), has_file=lambda p: (source / p).is_file())
    requirements = source / REQUIREMENTS_FILE
    text = requirements.read_text() if requirements.is_file() else None
    return declared_dependencies(manifest, text)


def stage(source: Path, workdir: Path, target: Target, progress: Callable[[str], None]) -> Path:
    """The directory to pack: `source` itself when it declares no dependencies, otherwise a
    copy in `workdir` with them installed in deps/ (the source directory is never written)."""
    source = source.resolve()
    requirements = declared_requirements(source)
    if not requirements:
        return source
    if (source / DEPS_DIR).exists():
        raise BundleError(
            DEPS_DIR, f"{source / DEPS_DIR} exists and agent.toml declares dependencies; publish "
            f"installs them into {DEPS_DIR}/, so remove the folder or the declaration",
        )
    staged = workdir / "bundle"
    shutil.copytree(source, staged, symlinks=True,
                    ignore=shutil.ignore_patterns(*SKIPPED_DIRS, *(f"*{s}" for s in SKIPPED_SUFFIXES)))
    count = f"{len(requirements)} dependenc{'y' if len(requirements) == 1 else 'ies'}"
    origin = REQUIREMENTS_FILE if (source / REQUIREMENTS_FILE).is_file() else MANIFEST
    progress(f"vendoring {count} from {origin} for {target.describe()}...")
    install_dependencies(requirements, staged / DEPS_DIR, target)
    return staged


def install_dependencies(requirements: Sequence[str], deps: Path, target: Target) -> None:
    """pip-installs `requirements` for `target` into `deps`, then strips what would make two
    installs of the same wheels differ. pip's own download cache is kept, so a republish is fast."""
    command = [sys.executable, "-m", "pip", "install", "--target", str(deps), "--no-compile",
               "--disable-pip-version-check", "--no-input", *target.pip_args(), *requirements]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines()[-_PIP_ERROR_LINES:]
        raise BundleError(
            DEPS_DIR, f"pip could not install the dependencies for {target.describe()} "
            "(each must have a wheel for that Python and platform):\n" + "\n".join(lines),
        )
    make_deterministic(deps)


def make_deterministic(deps: Path) -> None:
    shutil.rmtree(deps / "bin", ignore_errors=True)
    for cache in sorted(deps.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache, ignore_errors=True)
    for info in deps.glob("*.dist-info"):
        for name in _VOLATILE_DIST_INFO:
            (info / name).unlink(missing_ok=True)
