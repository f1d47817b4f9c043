"""The order of bubblewrap's mounts: binds under /tmp must land on top of the scratch tmpfs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.executor.drivers.base import SandboxSpec

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (scripts/setup-sandbox.sh)")


def test_a_virtualenv_under_tmp_is_not_hidden_by_the_scratch_tmpfs(tmp_path: Path) -> None:
    from services.executor.drivers.bwrap import BwrapDriver, Layout

    venv = "/tmp/some-clone/.venv"
    layout = Layout(python=f"{venv}/bin/python", binds=("/root/.pyenv/versions/3.11.7", venv))
    spec = SandboxSpec(session="sessions/s", version="agents/a/versions/1", bundle_dir=tmp_path,
                       workdir=tmp_path, entrypoint="agent:app", prompt_file="", python=layout.python)
    args = BwrapDriver().arguments(spec, layout, seccomp_fd=3)
    tmpfs = args.index("--tmpfs")
    assert args[tmpfs + 1] == "/tmp"
    binds = [i for i, a in enumerate(args) if a == "--ro-bind" and args[i + 1] == venv]
    assert binds and binds[0] > tmpfs
    assert "--unshare-all" in args and "--cap-drop" in args and "--seccomp" in args
