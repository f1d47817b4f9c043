"""A cgroup per sandbox, beneath the executor's own: memory (no swap), pids and a CPU quota, on
cgroup v1 or v2, whichever the host mounts with the controllers we need. Names carry a fixed
prefix and the executor's pid, so a restarted executor can find what a crashed one left."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "corral-sbx"
_V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
_V2_CONTROLLERS = ("memory", "pids", "cpu")
CFS_PERIOD_US = 100_000


class CgroupsUnavailable(RuntimeError):
    """Neither a v1 nor a v2 hierarchy with memory, pids and cpu is mounted and writable."""


@dataclass(frozen=True)
class Limits:
    memory_mb: int
    pids_max: int
    cpus: float = 1.0  # the CFS quota, in CPUs


@dataclass(frozen=True)
class Hierarchy:
    """Where sandbox cgroups go: for v1 the executor's own cgroup in each controller's mount,
    for v2 the executor's own cgroup in the unified mount."""

    version: int
    bases: tuple[tuple[str, Path], ...]  # (controller, directory); v2 has one ("", dir)

    def base(self, controller: str) -> Path:
        for name, path in self.bases:
            if name == controller or self.version == 2:
                return path
        raise KeyError(controller)

    def directories(self) -> list[Path]:
        return sorted({path for _, path in self.bases})


def _own_paths(cgroup_text: str) -> tuple[dict[str, str], str | None]:
    """/proc/self/cgroup → ({v1 controller: path}, v2 path or None)."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        for name in controllers.split(","):
            if name:
                v1[name] = path
    return v1, v2


def detect(mounts_text: str | None = None, cgroup_text: str | None = None) -> Hierarchy:
    """Picks v1 when its controllers are mounted (hybrid hosts keep memory there), else v2 when
    the unified mount offers memory, pids and cpu. Reads /proc/self/{mounts,cgroup} by default."""
    mounts_text = mounts_text if mounts_text is not None else Path("/proc/self/mounts").read_text()
    cgroup_text = cgroup_text if cgroup_text is not None else Path("/proc/self/cgroup").read_text()
    own_v1, own_v2 = _own_paths(cgroup_text)
    v1_mounts: dict[str, Path] = {}
    v2_mount: Path | None = None
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        where, fstype, options = Path(fields[1]), fields[2], fields[3].split(",")
        if fstype == "cgroup":
            for option in options:
                if option in _V1_CONTROLLERS:
                    v1_mounts[option] = where
        elif fstype == "cgroup2":
            v2_mount = where
    if all(c in v1_mounts and c in own_v1 for c in _V1_CONTROLLERS):
        bases = tuple((c, v1_mounts[c] / own_v1[c].lstrip("/")) for c in _V1_CONTROLLERS)
        return Hierarchy(1, bases)
    if v2_mount is not None and own_v2 is not None:
        base = v2_mount / own_v2.lstrip("/")
        try:
            available = (base / "cgroup.controllers").read_text().split()
        except OSError:
            available = []
        if all(c in available for c in _V2_CONTROLLERS):
            return Hierarchy(2, (("", base),))
    raise CgroupsUnavailable(
        "no cgroup hierarchy with memory, pids and cpu controllers is mounted "
        f"(v1 controllers found: {sorted(v1_mounts)}; cgroup2 at {v2_mount})"
    )


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _pid_alive(pid: int) -> bool:
    """A crashed executor may linger as a zombie until its parent reaps it: that is gone too."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _enable_v2_controllers(base: Path) -> None:
    """cgroup v2 only hands controllers to children of a cgroup that holds no processes itself:
    if the executor's cgroup does, its processes move into a leaf beside the sandboxes."""
    control = base / "cgroup.subtree_control"
    wanted = " ".join(f"+{c}" for c in _V2_CONTROLLERS)
    enabled = control.read_text().split()
    if all(c in enabled for c in _V2_CONTROLLERS):
        return
    try:
        _write(control, wanted)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        leaf = base / f"{PREFIX}-executor"
        leaf.mkdir(exist_ok=True)
        for pid in (base / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # exited meanwhile, or a kernel thread
                _write(leaf / "cgroup.procs", pid)
        log.info("moved the executor's processes into %s to delegate cgroup controllers", leaf)
        _write(control, wanted)


class SandboxCgroup:
    """One sandbox's cgroup (one directory per v1 controller, one in v2)."""

    def __init__(self, hierarchy: Hierarchy, name: str, dirs: dict[str, Path]) -> None:
        self.hierarchy = hierarchy
        self.name = name
        self._dirs = dirs  # controller → directory ("" for v2)

    @classmethod
    def create(
        cls, hierarchy: Hierarchy, limits: Limits, owner_pid: int | None = None
    ) -> SandboxCgroup:
        name = f"{PREFIX}.{owner_pid or os.getpid()}.{uuid.uuid4().hex[:12]}"
        if hierarchy.version == 1:
            dirs = {c: hierarchy.base(c) / name for c, _ in hierarchy.bases}
        else:
            _enable_v2_controllers(hierarchy.base(""))
            dirs = {"": hierarchy.base("") / name}
        group = cls(hierarchy, name, dirs)
        try:
            for path in group.directories():
                path.mkdir()
            group._apply(limits)
        except BaseException:
            group.remove()
            raise
        return group

    def directories(self) -> list[Path]:
        return sorted(set(self._dirs.values()))

    def _dir(self, controller: str) -> Path:
        return self._dirs[controller if self.hierarchy.version == 1 else ""]

    def _apply(self, limits: Limits) -> None:
        memory = limits.memory_mb * 1024 * 1024
        quota = max(1000, int(CFS_PERIOD_US * limits.cpus))
        if self.hierarchy.version == 1:
            mem = self._dir("memory")
            _write(mem / "memory.limit_in_bytes", str(memory))
            # Without swap accounting the file is absent; with it, memory+swap gets the same
            # cap so the sandbox cannot page out to dodge its limit.
            if (mem / "memory.memsw.limit_in_bytes").exists():
                _write(mem / "memory.memsw.limit_in_bytes", str(memory))
            _write(self._dir("pids") / "pids.max", str(limits.pids_max))
            cpu = self._dir("cpu")
            _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(quota))
        else:
            d = self._dir("")
            _write(d / "memory.max", str(memory))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")
            _write(d / "pids.max", str(limits.pids_max))
            _write(d / "cpu.max", f"{quota} {CFS_PERIOD_US}")

    def add(self, pid: int) -> None:
        """Moves `pid` (and so everything it later starts) into every controller's cgroup."""
        for path in self.directories():
            _write(path / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        found: set[int] = set()
        for path in self.directories():
            with contextlib.suppress(FileNotFoundError):
                found.update(int(p) for p in (path / "cgroup.procs").read_text().split())
        return sorted(found)

    def cpu_seconds(self) -> float:
        try:
            if self.hierarchy.version == 1:
                return int((self._dir("cpuacct") / "cpuacct.usage").read_text()) / 1e9
            for line in (self._dir("") / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
        except (FileNotFoundError, ValueError):
            pass
        return 0.0

    def memory_bytes(self) -> int:
        name = "memory.usage_in_bytes" if self.hierarchy.version == 1 else "memory.current"
        try:
            return int((self._dir("memory") / name).read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def oom_kills(self) -> int:
        """How many processes the kernel killed for going over the memory limit."""
        name = "memory.oom_control" if self.hierarchy.version == 1 else "memory.events"
        return _counter(self._dir("memory") / name, "oom_kill")

    def pids_refused(self) -> int:
        """How many forks the pids limit refused."""
        return _counter(self._dir("pids") / "pids.events", "max")

    def signal_all(self) -> bool:
        """One SIGKILL to every process in the cgroup, without waiting; False if it was empty."""
        if self.hierarchy.version == 2 and (self._dir("") / "cgroup.kill").exists():
            try:
                _write(self._dir("") / "cgroup.kill", "1")
            except FileNotFoundError:
                return False
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return bool(pids)

    def kill_all(self) -> None:
        """SIGKILLs every process in the cgroup, again until none is left (a fork bomb keeps
        starting new ones between a read and a kill; the pids limit bounds how many). Blocks:
        call it from a thread in async code."""
        for _ in range(200):
            if not self.signal_all():
                return
            time.sleep(0.005)
        log.warning("cgroup %s still has processes after repeated SIGKILLs", self.name)

    def remove(self, timeout_s: float = 5.0) -> bool:
        """Kills what is left and removes the directories; True when all are gone."""
        deadline = time.monotonic() + timeout_s
        remaining = [p for p in self.directories() if p.exists()]
        while remaining:
            self.kill_all()
            for path in list(remaining):
                try:
                    path.rmdir()
                    remaining.remove(path)
                except FileNotFoundError:
                    remaining.remove(path)
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
            if not remaining:
                break
            if time.monotonic() > deadline:
                log.warning("could not remove cgroup %s: %s still busy", self.name, remaining)
                return False
            time.sleep(0.01)
        return True


def _counter(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (FileNotFoundError, ValueError):
        pass
    return 0


def orphans(hierarchy: Hierarchy) -> list[Path]:
    """Sandbox cgroups whose executor (the pid in the name) is gone."""
    found: set[Path] = set()
    for base in hierarchy.directories():
        try:
            entries: Iterable[Path] = list(base.iterdir())
        except FileNotFoundError:
            continue
        for path in entries:
            parts = path.name.split(".")
            if len(parts) != 3 or parts[0] != PREFIX or not path.is_dir():
                continue
            try:
                owner = int(parts[1])
            except ValueError:
                continue
            if not _pid_alive(owner):
                found.add(path)
    return sorted(found)


def remove_orphans(hierarchy: Hierarchy) -> int:
    """Kills and removes what crashed executors left; returns how many cgroups were removed."""
    by_name: dict[str, dict[str, Path]] = {}
    for path in orphans(hierarchy):
        controller = "" if hierarchy.version == 2 else next(
            (c for c, base in hierarchy.bases if base == path.parent), ""
        )
        by_name.setdefault(path.name, {})[controller] = path
    removed = 0
    for name, dirs in by_name.items():
        if hierarchy.version == 1:
            # Co-mounted controllers share a directory: keep every controller's entry.
            dirs = {c: base / name for c, base in hierarchy.bases if (base / name).exists()}
        if SandboxCgroup(hierarchy, name, dirs).remove():
            log.info("removed cgroup %s left by a previous executor", name)
            removed += 1
    return removed
