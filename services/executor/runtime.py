"""The agents' runtime: the interpreter the bwrap and gvisor sandboxes run, in a prefix of its own
(ROOT/<id>, /opt/corral-runtime by default), outside the checkout and outside /root, owned by
root and readable by everyone. It holds a relocated copy of the platform's interpreter (its
binary, libpython and standard library, without site-packages), and in its site-packages
corral.sdk with its two workers (corral's protocol and the AgentCore bridge) and what they import
at run time: the sandbox contract (protobuf) and OpenTelemetry. Nothing else: an agent imports
the standard library, corral.sdk and what its bundle vendors.

The id names what is inside (the interpreter's version, the SDK's files, the distributions'
versions), so a runtime never changes once installed, and checkouts of different versions on one
host use runtimes of their own. `make` installs it (scripts/setup_runtime.py); the drivers find
it with `installed()`."""

from __future__ import annotations

import compileall
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(os.environ.get("CORRAL_RUNTIME_ROOT") or "/opt/corral-runtime")
# What the workers import beyond the standard library, with what those need.
DISTRIBUTIONS = ("protobuf", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-common")
# corral's own files the workers need, relative to the directory holding the corral package.
_SDK_GLOBS = (
    "corral/__init__.py", "corral/py.typed", "corral/names.py", "corral/sdk/*.py",
    "corral/sandbox/__init__.py", "corral/sandbox/v1/__init__.py", "corral/sandbox/v1/sandbox_pb2.py",
)
# Parts of the standard library no agent needs (tests, GUI, the tools that install packages).
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip",
                "lib2to3", "__phello__"}
_DONE = ".complete"


def _python_name() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}"


def _sdk_files() -> list[Path]:
    import corral

    base = Path(corral.__file__).resolve().parent.parent
    files = sorted({p for pattern in _SDK_GLOBS for p in base.glob(pattern)})
    if not any(p.name == "sandbox_pb2.py" for p in files):
        raise RuntimeError("corral/sandbox/v1/sandbox_pb2.py is missing: run `make proto` first")
    return files


def _distributions() -> dict[str, importlib.metadata.Distribution]:
    """DISTRIBUTIONS and every distribution they require (no extras), as installed here."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(DISTRIBUTIONS)
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in found:
            continue
        found[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def runtime_id() -> str:
    """The name of the runtime this checkout and interpreter install: the interpreter's version
    and a digest of everything copied into it and of this installer."""
    digest = hashlib.sha256(sys.version.encode())
    digest.update(os.path.realpath(sys.base_prefix).encode())
    digest.update(Path(__file__).read_bytes())  # how it is installed
    for path in _sdk_files():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for name, dist in sorted(_distributions().items()):
        digest.update(f"{name}=={dist.version}".encode())
    version = ".".join(map(str, sys.version_info[:3]))
    return f"py{version}-{digest.hexdigest()[:12]}"


def interpreter(prefix: Path) -> Path:
    return prefix / "bin" / _python_name()


def installed(root: Path = ROOT) -> Path | None:
    """The interpreter of this checkout's runtime, if it is installed."""
    prefix = root / runtime_id()
    return interpreter(prefix) if (prefix / _DONE).exists() else None


def install(root: Path = ROOT, say: Callable[[str], None] = print) -> Path:
    """Installs this checkout's runtime under `root` unless it is there; returns its interpreter.
    Built in a temporary directory beside it and renamed into place, so a runtime is complete or
    absent."""
    prefix = root / runtime_id()
    if (prefix / _DONE).exists():
        say(f"runtime: {prefix} already installed")
        return interpreter(prefix)
    say(f"runtime: installing the agents' interpreter and corral.sdk into {prefix}...")
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    work = Path(tempfile.mkdtemp(prefix=".installing-", dir=root))
    try:
        _copy_interpreter(work)
        site = site_packages(work)
        site.mkdir(parents=True)
        base = Path(_sdk_files()[0]).parent.parent
        for path in _sdk_files():
            _copy(path, site / path.relative_to(base))
        for dist in _distributions().values():
            for file in dist.files or []:
                source = Path(str(dist.locate_file(file)))
                if source.is_file() and not str(file).startswith(".."):
                    _copy(source, site / file)
        # Compiled once here: sandboxes write no bytecode (PYTHONDONTWRITEBYTECODE).
        compileall.compile_dir(site, quiet=2, ddir=prefix / site.relative_to(work))
        _readable(work)
        (work / _DONE).write_text(runtime_id() + "\n")
        shutil.rmtree(prefix, ignore_errors=True)  # a half-installed one (no _DONE)
        work.rename(prefix)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    say(f"runtime: installed {prefix}")
    return interpreter(prefix)


def site_packages(prefix: Path) -> Path:
    """Where the interpreter copied into `prefix` looks for packages, asked of it: CPython as
    built (pyenv, python.org) reads lib/python3.X/site-packages, Debian's reads
    lib/python3/dist-packages (and local/..., lib/python3.X/dist-packages) instead."""
    ask = "import site; print(*site.getsitepackages(), sep='\\n')"
    found = subprocess.run([str(interpreter(prefix)), "-I", "-c", ask],
                           capture_output=True, text=True, check=True, timeout=60).stdout.split()
    home = Path(os.path.realpath(prefix))
    inside = [Path(os.path.realpath(p)) for p in found]
    inside = [p for p in inside if p.is_relative_to(home) and p.relative_to(home).parts[0] == "lib"]
    if not inside:
        raise RuntimeError(f"the interpreter in {prefix} looks for packages nowhere under "
                           f"{prefix}/lib: {found}")
    standard = home / "lib" / _python_name() / "site-packages"
    return prefix / (standard if standard in inside else inside[0]).relative_to(home)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def _copy_interpreter(prefix: Path) -> None:
    """The platform's interpreter (its base, not a virtualenv), relocated to `prefix`."""
    base = Path(os.path.realpath(sys.base_prefix))
    binary = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    _copy(binary, interpreter(prefix))
    _relocate(interpreter(prefix), str(base / "lib"))
    (prefix / "bin" / "python3").symlink_to(_python_name())
    libdir = Path(sysconfig.get_config_var("LIBDIR") or base / "lib")
    ldlibrary = sysconfig.get_config_var("LDLIBRARY") or ""
    (prefix / "lib").mkdir(exist_ok=True)
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and ldlibrary:
        for lib in sorted(libdir.glob(f"{ldlibrary}*")):
            target = Path(os.path.realpath(lib))
            if lib.is_symlink() and target.parent == libdir:  # libpython3.X.so → ….so.1.0
                (prefix / "lib" / lib.name).symlink_to(target.name)
            else:
                _copy(target, prefix / "lib" / lib.name)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shutil.copytree(
        stdlib, prefix / "lib" / _python_name(), symlinks=True,
        ignore=lambda d, names: [n for n in names if Path(d) == stdlib and _skipped(n)],
    )


def _skipped(name: str) -> bool:
    """Not copied from the standard library's top level: see _STDLIB_SKIP; and config-3.X-*,
    the static libpython and Makefile for building extensions."""
    return name in _STDLIB_SKIP or name.startswith("config-")


def _relocate(binary: Path, libdir: str) -> None:
    """Points the binary's RUNPATH (where pyenv's build looks for libpython) at the copy's own
    lib directory: the same bytes, the old path overwritten in place with `$ORIGIN/../lib` and
    padded with NULs. Binaries without it (a distribution's Python) are left alone."""
    data = binary.read_bytes()
    old = libdir.encode() + b"\0"
    new = b"$ORIGIN/../lib\0"
    if data.count(old) == 0:
        return
    if data.count(old) != 1 or len(new) > len(old):
        raise RuntimeError(f"cannot relocate {binary}: its library path {libdir} is not patchable")
    binary.write_bytes(data.replace(old, new.ljust(len(old), b"\0")))


def _readable(prefix: Path) -> None:
    """Owned by whoever installs (root) and readable by everyone, the sandbox's user included."""
    for path in _walk(prefix):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod((mode | 0o444 | (0o111 if path.is_dir() or mode & 0o100 else 0)) & ~0o022)


def _walk(top: Path) -> Iterator[Path]:
    yield top
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            yield Path(dirpath) / name
