"""The `gvisor` driver: the worker runs under gVisor (`runsc run`, ptrace platform, no network),
so its system calls reach gVisor's user-space kernel rather than the host's. It sees what a bwrap
sandbox sees: read-only /usr, the interpreter, the virtualenv, the corral package and its bundle,
a private size-limited tmpfs, as uid/gid 65534 with no capabilities and no_new_privs.

runsc cannot hand arbitrary descriptors to the container, but it does donate its stdio: the
worker's end of the socketpair is the container's stdin (the worker swaps it for /dev/null). The
whole of gVisor (runsc, its gofer, the sentry and its ptrace stubs) runs in one SandboxCgroup,
entered through the same gate as bwrap; `--ignore-cgroups` stops runsc moving itself out of it
into cgroups of its own at the top of each hierarchy."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.executor.drivers.base import SandboxSpec, worker_module
from services.executor.drivers.bwrap import (
    BUNDLE_MOUNT,
    NOBODY,
    SCRATCH,
    BwrapWorker,
    GatedDriver,
    Layout,
    SandboxUnavailable,
    start_gated,
)
from services.executor.drivers.cgroups import Limits, SandboxCgroup, _pid_alive
from services.executor.drivers.cgroups import (
    remove_orphans as remove_orphan_cgroups,
)

log = logging.getLogger(__name__)

# runsc's state lives in memory-backed /run: nothing of it is meant to survive a reboot.
STATE_ROOT = Path("/run/corral-runsc")
CONTAINER_PREFIX = "corral"
# The agent's processes are limited inside gVisor (RLIMIT_NPROC: its kernel counts only this
# sandbox's). The host pids cgroup also holds gVisor's own threads (Go runtime, gofer, ptrace
# stubs): were it the one to refuse, the sentry would die ("failed to create new OS thread")
# instead of the fork failing with EAGAIN, so it gets this much room on top.
GVISOR_THREADS = 200
INSTALL_HINT = (
    "the gvisor sandbox driver needs runsc (gVisor): run scripts/setup-sandbox.sh as root "
    "(Debian/Ubuntu: apt-get install runsc)"
)
# Waits for one line on the gate pipe (fd $1), then becomes runsc, whose stdin is the worker's
# socket. The gate stays open for the sandbox's life: a watcher kills runsc (and with it the
# sandbox, which runsc starts `--attached`) when it reads end-of-file, that is when the executor
# dies. bash, not sh: dash cannot redirect from a descriptor above 9; --norc, or bash would read
# ~/.bashrc because its stdin is a socket (its rshd heuristic).
_GATE = (
    'g=$1; shift; read -r go <&"$g" || exit 125; '
    '{ read -r _ <&"$g"; kill -KILL $$; } </dev/null >/dev/null 2>&1 & '
    'exec "$@" {g}<&-'
)
_CONTAINER_ID = re.compile(rf"^{CONTAINER_PREFIX}-(\d+)-[0-9a-f]+$")


class GvisorWorker(BwrapWorker):
    """A running gVisor sandbox. Same watchdog, kill and limits as bwrap's; once it has ended,
    its runsc state and OCI bundle are removed and the executor's end of the gate closed."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        cgroup: SandboxCgroup,
        spec: SandboxSpec,
        container: Path,
        lifeline: int,
    ) -> None:
        self.container = container
        self._lifeline = lifeline
        super().__init__(proc, cgroup, spec)

    async def _watch(self) -> None:
        try:
            await super()._watch()
        finally:
            # After the cgroup is gone: the watcher is dead and cannot kill a reused pid.
            with contextlib.suppress(OSError):
                os.close(self._lifeline)
            await asyncio.shield(asyncio.to_thread(_remove_container, self.container))


def _remove_container(bundle: Path) -> None:
    """The container's OCI bundle and the files runsc keeps about it in its --root."""
    state = bundle.parent.parent / "state"
    with contextlib.suppress(FileNotFoundError):
        for entry in state.iterdir():
            if entry.name.startswith(f"{bundle.name}_") or entry.name == bundle.name:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
    shutil.rmtree(bundle, ignore_errors=True)


def _mount(destination: str, source: str, kind: str = "bind", *options: str) -> dict[str, Any]:
    return {"destination": destination, "type": kind, "source": source, "options": list(options)}


@dataclass(kw_only=True, eq=False)
class GvisorDriver(GatedDriver):
    name = "gvisor"
    binary: str = "runsc"
    state_root: Path = STATE_ROOT
    # The host's pids limit: the agent's processes plus room for gVisor's own threads.
    host_pids_max: int = field(init=False)
    # One directory per executor (named by its pid, like its cgroups) so that a restarted
    # executor can tell what a crashed one left from what a live one is using.
    home: Path = field(init=False)
    rootfs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.binary = self._installed(self.binary, INSTALL_HINT)
        self.cgroups = self._writable_cgroups("run the executor as root")
        if os.geteuid() != 0:
            raise SandboxUnavailable("the gvisor driver runs runsc, which needs root")
        self.python = self._runtime()
        self.host_pids_max = 4 * self.pids_max + GVISOR_THREADS
        self.home = self.state_root / str(os.getpid())
        self.rootfs = self.state_root / "rootfs"

    async def _prepare(self, layout: Layout) -> None:
        await asyncio.to_thread(self._prepare_rootfs, layout)

    def root_of(self, layout: Layout) -> Path:
        """The read-only root of sandboxes running `layout`'s interpreter: one per layout, so
        that it holds the mount points of that layout's binds and no other's (an empty /root
        left by another interpreter's layout would still show)."""
        digest = hashlib.sha256("\0".join(layout.binds).encode()).hexdigest()[:12]
        return self.rootfs / digest

    def _prepare_rootfs(self, layout: Layout) -> None:
        """The container's read-only root: empty mount points and the host's /lib-style
        symlinks into /usr. Shared by every sandbox of the layout; creating it again is
        harmless."""
        rootfs = self.root_of(layout)
        for path in ("usr", "tmp", "proc", "dev", "sys", BUNDLE_MOUNT, *layout.binds):
            (rootfs / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        for top in self._tops():
            target = rootfs / top.lstrip("/")
            if os.path.islink(top) and not target.is_symlink():
                target.symlink_to(os.readlink(top))
            elif not os.path.islink(top):
                target.mkdir(exist_ok=True)

    @staticmethod
    def _tops() -> list[str]:
        return [t for t in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
                if os.path.lexists(t)]

    def config(self, spec: SandboxSpec, layout: Layout) -> dict[str, Any]:
        """The OCI runtime spec (config.json) of one sandbox."""
        scratch = self.scratch_mb * 1024 * 1024
        mounts = [
            _mount("/proc", "proc", "proc"),
            _mount("/dev", "tmpfs", "tmpfs"),
            _mount(SCRATCH, "tmpfs", "tmpfs", f"size={scratch}", "mode=1777"),
            _mount("/usr", "/usr", "bind", "ro", "rbind"),
        ]
        mounts += [_mount(t, t, "bind", "ro", "rbind")
                   for t in self._tops() if not os.path.islink(t)]
        mounts += [_mount(path, path, "bind", "ro", "rbind") for path in layout.binds]
        mounts.append(_mount(BUNDLE_MOUNT, str(spec.bundle_dir), "bind", "ro", "rbind"))
        return {
            "ociVersion": "1.0.0",
            "hostname": "corral-sandbox",
            "root": {"path": str(self.root_of(layout)), "readonly": True},
            "mounts": mounts,
            "process": {
                "terminal": False,
                "user": {"uid": NOBODY, "gid": NOBODY},
                "args": self.command(spec, layout),
                # Nothing of the executor's environment.
                "env": [
                    "PATH=/usr/bin:/bin", f"HOME={SCRATCH}", f"TMPDIR={SCRATCH}",
                    "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "LANG=C.UTF-8",
                ],
                "cwd": SCRATCH,
                "noNewPrivileges": True,
                "capabilities": {"bounding": [], "effective": [], "inheritable": [],
                                 "permitted": [], "ambient": []},
                "rlimits": [
                    {"type": "RLIMIT_NOFILE", "hard": self.nofile, "soft": self.nofile},
                    {"type": "RLIMIT_FSIZE", "hard": scratch, "soft": scratch},
                    {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
                    {"type": "RLIMIT_NPROC", "hard": self.pids_max, "soft": self.pids_max},
                ],
            },
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            },
        }

    def arguments(self, container_id: str, bundle: Path) -> list[str]:
        """runsc's command line, without the binary."""
        return [
            f"--root={self.home / 'state'}",
            "--network=none",  # runsc's default network needs iptables; the sandbox gets none
            "--platform=ptrace",  # kvm hangs on these hosts
            "--ignore-cgroups",  # stay in the SandboxCgroup the gate put us in
            "run", f"--bundle={bundle}", container_id,
        ]

    def command(self, spec: SandboxSpec, layout: Layout) -> list[str]:
        """What runs inside: the worker, whose channel is its stdin (fd 0)."""
        return [
            layout.python, "-m", worker_module(spec.protocol),
            "0", BUNDLE_MOUNT, spec.entrypoint, spec.prompt_file, json.dumps(spec.resource),
        ]

    def _write_bundle(self, container_id: str, config: dict[str, Any]) -> Path:
        (self.home / "state").mkdir(parents=True, exist_ok=True, mode=0o700)
        bundle = self.home / "bundles" / container_id
        bundle.mkdir(parents=True, mode=0o700)
        (bundle / "config.json").write_text(json.dumps(config))
        return bundle

    def _enter(self, pid: int, *, cgroup: SandboxCgroup) -> None:
        """Puts the gated process into its cgroup, before it runs runsc. No RLIMIT_FSIZE here:
        the sentry's guest memory is a host file, and the scratch size is enforced inside."""
        resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))
        cgroup.add(pid)

    async def spawn(self, spec: SandboxSpec, socket_fd: int) -> GvisorWorker:
        layout = await self.layout(spec.python or self.python)
        container_id = f"{CONTAINER_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        bundle = await asyncio.to_thread(
            self._write_bundle, container_id, self.config(spec, layout)
        )
        cgroup = await asyncio.to_thread(
            SandboxCgroup.create, self.cgroups,
            Limits(spec.memory_mb, self.host_pids_max, self.cpus),
        )
        gate_read, gate_write = os.pipe()
        try:
            proc = await start_gated(
                ["/bin/bash", "--norc", "--noprofile", "-c", _GATE, "corral-sandbox",
                 str(gate_read), self.binary, *self.arguments(container_id, bundle)],
                gate_read, gate_write, cgroup, functools.partial(self._enter, cgroup=cgroup),
                # runsc donates its stdio to the container: the socket is the worker's fd 0.
                stdin=socket_fd, pass_fds=(gate_read,),
            )
        except BaseException:
            await asyncio.to_thread(_remove_container, bundle)
            os.close(gate_write)
            raise
        return GvisorWorker(proc, cgroup, spec, bundle, gate_write)

    def remove_orphans(self) -> int:
        """What crashed executors left: their sandboxes' cgroups (killing what still runs in
        them), cgroups runsc made at the top of each hierarchy for their containers, and their
        runsc state. Returns how many sandboxes were cleaned up."""
        removed = remove_orphan_cgroups(self.cgroups)
        removed += _remove_top_level_cgroups()
        with contextlib.suppress(FileNotFoundError):
            for entry in self.state_root.iterdir():
                if entry.name.isdigit() and not _pid_alive(int(entry.name)):
                    log.info("removing runsc state left by executor %s", entry.name)
                    shutil.rmtree(entry, ignore_errors=True)
        return removed


def _cgroup_mounts() -> list[Path]:
    mounts: list[Path] = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] in ("cgroup", "cgroup2"):
            mounts.append(Path(fields[1]))
    return mounts


def _remove_top_level_cgroups() -> int:
    """runsc without --ignore-cgroups puts each container in a cgroup named after it at the top
    of every hierarchy, and leaves them when it does not exit cleanly."""
    removed = 0
    for mount in _cgroup_mounts():
        with contextlib.suppress(OSError):
            for path in mount.iterdir():
                match = _CONTAINER_ID.match(path.name)
                if not match or _pid_alive(int(match.group(1))) or not path.is_dir():
                    continue
                _kill_and_rmdir(path)
                removed += 1
    return removed


def _kill_and_rmdir(path: Path) -> None:
    for _ in range(100):
        with contextlib.suppress(FileNotFoundError):
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            path.rmdir()
            log.info("removed cgroup %s left by runsc", path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
        time.sleep(0.01)
    log.warning("could not remove cgroup %s left by runsc", path)
