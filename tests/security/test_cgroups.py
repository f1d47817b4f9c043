"""Sandbox cgroups: v1 or v2 picked by what is mounted, the limits written where each version
wants them, and the clean-up of what a crashed executor left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.executor.drivers import cgroups
from services.executor.drivers.cgroups import CgroupsUnavailable, Hierarchy, Limits, SandboxCgroup
from tests.harness import writable_cgroups

HYBRID_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
HYBRID_CGROUP = "8:pids:/\n4:memory:/svc/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n"


def test_hybrid_host_uses_v1_beneath_the_executors_own_cgroups() -> None:
    h = cgroups.detect(HYBRID_MOUNTS, HYBRID_CGROUP)
    assert h.version == 1
    assert h.base("memory") == Path("/sys/fs/cgroup/memory/svc/abc")
    assert h.base("pids") == Path("/sys/fs/cgroup/pids")


def test_co_mounted_v1_controllers_share_one_directory() -> None:
    mounts = ("cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n"
              "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n"
              "cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\n")
    h = cgroups.detect(mounts, "5:cpu,cpuacct:/x\n4:memory:/x\n3:pids:/x\n")
    assert h.base("cpu") == h.base("cpuacct") == Path("/sys/fs/cgroup/cpu,cpuacct/x")
    assert len(h.directories()) == 3


def fake_v2(root: Path, controllers: str = "cpuset cpu io memory pids") -> Path:
    base = root / "system.slice" / "corral.service"
    base.mkdir(parents=True)
    (base / "cgroup.controllers").write_text(controllers + "\n")
    (base / "cgroup.subtree_control").write_text("memory pids cpu\n")
    return base


def test_unified_host_uses_v2(tmp_path: Path) -> None:
    base = fake_v2(tmp_path)
    h = cgroups.detect(f"cgroup2 {tmp_path} cgroup2 rw 0 0\n", "0::/system.slice/corral.service\n")
    assert h == Hierarchy(2, (("", base),))


def test_v2_without_the_memory_controller_is_refused(tmp_path: Path) -> None:
    fake_v2(tmp_path, controllers="hugetlb")
    with pytest.raises(CgroupsUnavailable, match="memory, pids and cpu"):
        cgroups.detect(f"cgroup2 {tmp_path} cgroup2 rw 0 0\n", "0::/system.slice/corral.service\n")


def test_v2_limits_are_written_in_v2_files(tmp_path: Path) -> None:
    base = fake_v2(tmp_path)
    hierarchy = Hierarchy(2, (("", base),))
    group = SandboxCgroup.create(hierarchy, Limits(memory_mb=64, pids_max=32, cpus=1.0))
    (d,) = group.directories()
    assert d.parent == base and d.name.startswith(f"{cgroups.PREFIX}.{os.getpid()}.")
    assert (d / "memory.max").read_text() == str(64 << 20)
    assert (d / "pids.max").read_text() == "32"
    assert (d / "cpu.max").read_text() == "100000 100000"


def test_orphans_are_the_cgroups_of_executors_that_are_gone(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    # Exited but not yet reaped, as a crashed executor is until its parent waits for it.
    zombie = subprocess.Popen([sys.executable, "-c", ""])
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    for name in (f"{gone.pid}.a", f"{zombie.pid}.b", f"{os.getpid()}.c"):
        (tmp_path / f"{cgroups.PREFIX}.{name}").mkdir()
    (tmp_path / "something-else").mkdir()
    h = Hierarchy(2, (("", tmp_path),))
    assert cgroups.orphans(h) == sorted(
        [tmp_path / f"{cgroups.PREFIX}.{gone.pid}.a", tmp_path / f"{cgroups.PREFIX}.{zombie.pid}.b"]
    )
    zombie.wait()


@pytest.mark.skipif(
    writable_cgroups() is None, reason="needs writable memory, pids and cpu cgroups (root)"
)
def test_a_crashed_executors_sandbox_is_killed_and_removed() -> None:
    hierarchy = writable_cgroups()
    assert hierarchy is not None
    crashed = subprocess.Popen([sys.executable, "-c", ""])
    crashed.wait()
    group = SandboxCgroup.create(hierarchy, Limits(64, 16), owner_pid=crashed.pid)
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        group.add(left.pid)
        assert left.pid in group.pids()
        assert set(group.directories()) <= set(cgroups.orphans(hierarchy))
        assert cgroups.remove_orphans(hierarchy) >= 1
        assert left.wait(timeout=5) == -9
        assert not any(d.exists() for d in group.directories())
    finally:
        left.kill()
        group.remove()
