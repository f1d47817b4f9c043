"""What the gvisor driver asks of runsc: its flags, and the OCI spec that decides what the
sandbox sees."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.executor.drivers.base import SandboxSpec
from services.executor.drivers.bwrap import Layout
from services.executor.drivers.cgroups import Hierarchy
from services.executor.drivers.gvisor import GvisorDriver

pytestmark = pytest.mark.skipif(
    shutil.which("runsc") is None,
    reason="runsc is not installed (scripts/setup-sandbox.sh installs it)",
)

VENV = "/tmp/some-clone/.venv"
LAYOUT = Layout(python=f"{VENV}/bin/python", binds=("/root/.pyenv/versions/3.11.7", VENV))


@pytest.fixture
def driver(tmp_path: Path) -> GvisorDriver:
    # A fake cgroup directory and state root: building arguments touches neither.
    return GvisorDriver(scratch_mb=16, pids_max=64, hierarchy=Hierarchy(2, (("", tmp_path),)),
                        state_root=tmp_path / "runsc")


def spec(tmp_path: Path) -> SandboxSpec:
    return SandboxSpec(session="sessions/s", version="agents/a/versions/1", bundle_dir=tmp_path,
                       workdir=tmp_path, entrypoint="agent:app", prompt_file="",
                       python=LAYOUT.python, resource={"service.name": "a"})


def test_runsc_runs_without_network_on_ptrace_inside_our_cgroup(
    driver: GvisorDriver, tmp_path: Path
) -> None:
    args = driver.arguments("corral-1-abc", tmp_path / "bundle")
    assert "--network=none" in args  # runsc's default network needs iptables
    assert "--platform=ptrace" in args  # kvm hangs on these hosts
    assert "--ignore-cgroups" in args  # else runsc leaves the SandboxCgroup
    root = next(a for a in args if a.startswith("--root="))
    assert Path(root.removeprefix("--root=")).is_relative_to(tmp_path / "runsc")
    assert args[-3:] == ["run", f"--bundle={tmp_path / 'bundle'}", "corral-1-abc"]


def test_the_sandbox_sees_read_only_binds_and_a_sized_scratch(
    driver: GvisorDriver, tmp_path: Path
) -> None:
    config = driver.config(spec(tmp_path), LAYOUT)
    assert config["root"]["readonly"] is True
    mounts = {m["destination"]: m for m in config["mounts"]}
    for path in ("/usr", VENV, "/root/.pyenv/versions/3.11.7"):
        assert mounts[path]["source"] == path and "ro" in mounts[path]["options"]
    assert mounts["/bundle"]["source"] == str(tmp_path) and "ro" in mounts["/bundle"]["options"]
    assert mounts["/tmp"]["type"] == "tmpfs" and f"size={16 << 20}" in mounts["/tmp"]["options"]
    assert all(m["type"] in ("bind", "tmpfs", "proc") for m in config["mounts"])


def test_the_worker_runs_as_nobody_without_privileges_or_the_executors_environment(
    driver: GvisorDriver, tmp_path: Path
) -> None:
    process = driver.config(spec(tmp_path), LAYOUT)["process"]
    assert process["user"] == {"uid": 65534, "gid": 65534}
    assert process["noNewPrivileges"] is True
    assert all(caps == [] for caps in process["capabilities"].values())
    assert {v.split("=")[0] for v in process["env"]} == {
        "PATH", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "LANG"}
    limits = {r["type"]: r["hard"] for r in process["rlimits"]}
    assert limits["RLIMIT_NPROC"] == 64
    assert limits["RLIMIT_FSIZE"] == 16 << 20


def test_the_channel_is_the_workers_stdin(
    driver: GvisorDriver, tmp_path: Path
) -> None:
    args = driver.config(spec(tmp_path), LAYOUT)["process"]["args"]
    assert args[:4] == [LAYOUT.python, "-m", "corral.sdk._runtime", "0"]
    assert args[4:6] == ["/bundle", "agent:app"]


def test_gvisors_own_threads_get_room_in_the_host_pids_limit(driver: GvisorDriver) -> None:
    # Below about 200 the sentry dies for want of threads before the agent's forks fail.
    assert driver.host_pids_max >= 200 + driver.pids_max
