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
    assert "--unshare-pid" in args or "--unshare-all" in args
    assert "--cap-drop" in args and "--seccomp" in args


def test_as_root_the_sandbox_drops_to_host_nobody_before_the_worker(tmp_path: Path) -> None:
    """Root's bwrap makes no user namespace (it would map the sandbox to host root): setpriv
    drops to uid/gid 65534 with no capabilities before the worker runs."""
    from services.executor.drivers.bwrap import BwrapDriver, Layout

    layout = Layout(python="/opt/corral-runtime/x/bin/python3.11", binds=("/opt/corral-runtime/x",))
    spec = SandboxSpec(session="sessions/s", version="agents/a/versions/1", bundle_dir=tmp_path,
                       workdir=tmp_path, entrypoint="agent:app", prompt_file="", python=layout.python)
    driver = BwrapDriver(python=layout.python)
    if not driver.as_root:
        pytest.skip("the executor runs as root only on hosts where the tests do")
    args = driver.arguments(spec, layout, seccomp_fd=3)
    assert "--unshare-user" not in args and "--uid" not in args
    caps = [args[i + 1] for i, a in enumerate(args) if a == "--cap-add"]
    assert sorted(caps) == ["CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID"]
    command = driver.command(spec, layout, socket_fd=4)
    assert command[:command.index("--") + 2] == [
        driver.setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
        "--bounding-set=-all", "--no-new-privs", "--", layout.python]
