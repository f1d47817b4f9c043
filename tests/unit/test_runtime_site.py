"""The agents' runtime puts corral.sdk where its interpreter looks for packages, which depends on
who built that interpreter: pyenv's CPython reads lib/python3.X/site-packages, Debian's (the
container image's) lib/python3/dist-packages."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from services.executor import runtime

PYTHON = f"python{sys.version_info.major}.{sys.version_info.minor}"


def interpreter_saying(prefix: Path, *paths: str) -> Path:
    """A stand-in interpreter in `prefix` whose site.getsitepackages() is `paths`."""
    binary = prefix / "bin" / PYTHON
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(f"'{p}'" for p in paths) + "\n")
    binary.chmod(0o755)
    return prefix


def test_cpython_as_built_reads_site_packages(tmp_path: Path) -> None:
    prefix = interpreter_saying(tmp_path, f"{tmp_path}/lib/{PYTHON}/site-packages")
    assert runtime.site_packages(prefix) == prefix / "lib" / PYTHON / "site-packages"


def test_debians_python_reads_dist_packages(tmp_path: Path) -> None:
    # What Debian 12's python3.11 answers for a prefix of its own.
    prefix = interpreter_saying(tmp_path, f"{tmp_path}/local/lib/{PYTHON}/dist-packages",
                                f"{tmp_path}/lib/python3/dist-packages",
                                f"{tmp_path}/lib/{PYTHON}/dist-packages")
    assert runtime.site_packages(prefix) == prefix / "lib" / "python3" / "dist-packages"


def test_an_interpreter_looking_nowhere_under_its_prefix_is_refused(tmp_path: Path) -> None:
    prefix = interpreter_saying(tmp_path, "/usr/lib/python3/dist-packages")
    with pytest.raises(RuntimeError, match="looks for packages nowhere"):
        runtime.site_packages(prefix)
