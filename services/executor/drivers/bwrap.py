"""The `bwrap` driver: the worker runs under bubblewrap in its own pid, network, ipc, uts, mount
and cgroup namespaces, as host uid/gid 65534 with no capabilities and no_new_privs (see
BwrapDriver.as_root for how, as root and not), seeing only read-only binds of /usr, the agents'
runtime (services/executor/runtime.py) and its bundle, plus a private size-limited tmpfs; with a
seccomp filter, rlimits and a cgroup of its own.

Start-up is gated so that no sandboxed instruction runs outside its cgroup or without its rlimits:
the driver starts `/bin/sh` blocked on a pipe, sets the rlimits on it (prlimit(2) from here, no
preexec_fn), writes its pid into the cgroup, and only then lets it exec bwrap. Everything bwrap
starts inherits both."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import ClassVar

from services.executor import runtime
from services.executor.drivers import seccomp
from services.executor.drivers.base import Limit, SandboxSpec, Usage, worker_module
from services.executor.drivers.cgroups import (
    Hierarchy,
    Limits,
    SandboxCgroup,
    detect,
    remove_orphans,
)

log = logging.getLogger(__name__)

NOBODY = 65534
BUNDLE_MOUNT = "/bundle"
SCRATCH = "/tmp"
MIN_VERSION = (0, 8, 0)  # --size for tmpfs
CPU_POLL_S = 0.2
KILL_GRACE_S = 1.0  # for the outer bwrap to exit after its sandbox was killed
OUTPUT_LOG_LIMIT = 64 * 1024  # bytes of a sandbox's stdout/stderr logged; the rest is dropped
# Waits for one line on stdin (the gate), then becomes bwrap with stdin on /dev/null.
_GATE = 'read -r go || exit 125; exec "$@" </dev/null'
_PROBE = (
    "import importlib.util, json, os, sys; s = importlib.util.find_spec('corral'); "
    "print(json.dumps({'prefix': sys.prefix, 'base_prefix': sys.base_prefix, "
    "'executable': os.path.realpath(sys.executable), "
    "'corral': os.path.dirname(s.origin) if s and s.origin else ''}))"
)


class SandboxUnavailable(RuntimeError):
    """bubblewrap (or what it needs) is not usable on this host; the message says how to fix it."""


class RuntimeMissing(SandboxUnavailable):
    """The sandbox tool is there but the agents' runtime is not installed: a set-up step to run,
    never a reason to run agents without isolation."""


@dataclass(frozen=True)
class Layout:
    """What of the host one interpreter needs to see, bound read-only at the same paths."""

    python: str
    binds: tuple[str, ...]


def bwrap_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    if not match:
        raise SandboxUnavailable(f"cannot read the version of {binary}: {out!r}")
    return tuple(int(part) for part in match.groups())


def _outermost(paths: list[str]) -> tuple[str, ...]:
    """Drops paths already inside another one (or inside /usr, which is always bound)."""
    kept: list[str] = []
    for path in sorted(set(paths), key=len):
        if not any(path == p or path.startswith(p.rstrip("/") + "/") for p in ["/usr", *kept]):
            kept.append(path)
    return tuple(kept)


async def probe_layout(python: str) -> Layout:
    """Asks the interpreter itself where it lives: what a sandbox must see of the host to run it."""
    proc = await asyncio.create_subprocess_exec(
        # Isolated (-I) and from /: the current directory (a checkout holding corral/) must not
        # be what it finds.
        python, "-I", "-c", _PROBE, env={"PATH": "/usr/bin:/bin"}, cwd="/",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise SandboxUnavailable(f"cannot inspect the worker interpreter {python}: {err.decode()[-500:]}")
    found = json.loads(out)
    paths = [found["base_prefix"], found["prefix"], os.path.dirname(found["executable"])]
    if found["corral"]:
        paths.append(found["corral"])
    real = [os.path.realpath(p) for p in paths]
    return Layout(python=python, binds=_outermost(real + paths))


class BwrapWorker:
    """A running bwrap sandbox: its outer process, its cgroup, and a watchdog that enforces the
    CPU-time budget and removes the cgroup once the sandbox has ended."""

    def __init__(
        self, proc: asyncio.subprocess.Process, cgroup: SandboxCgroup, spec: SandboxSpec
    ) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.cgroup = cgroup
        self.spec = spec
        # Which limit ended the sandbox, for a clear status; None otherwise.
        self.limit_hit: Limit | None = None
        self.cpu_used_s = 0.0
        self._escalation: asyncio.TimerHandle | None = None
        self._tasks = [
            asyncio.create_task(_drain(proc.stdout, spec.session, "stdout", logging.INFO)),
            asyncio.create_task(_drain(proc.stderr, spec.session, "stderr", logging.WARNING)),
        ]
        self._watchdog = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(CPU_POLL_S):
                        await self._proc.wait()
                except TimeoutError:
                    pass
                if self.returncode is not None:
                    break
                used = self.cgroup.cpu_seconds()
                if used > self.spec.cpu_seconds:
                    self.limit_hit = Limit.CPU
                    log.warning("sandbox of %s used %.1f CPU-seconds, over its %ss; killing it",
                                self.spec.session, used, self.spec.cpu_seconds)
                    self.kill()
        finally:
            if self._escalation is not None:
                self._escalation.cancel()
            self.cpu_used_s = self.cgroup.cpu_seconds()
            if self.limit_hit is None and self.cgroup.oom_kills() > 0:
                self.limit_hit = Limit.MEMORY
            await asyncio.shield(asyncio.to_thread(self.cgroup.remove))
            for task in self._tasks:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(task, 2.0)

    async def wait(self) -> int:
        code = await self._proc.wait()
        await asyncio.shield(self._watchdog)
        return code

    def kill(self) -> None:
        """Kills everything inside; the outer bwrap then reaps the sandbox's init and exits by
        itself. Killing the outer bwrap first would also end the sandbox (--die-with-parent),
        but would leave its init to the host's pid 1 to reap."""
        if self._proc.returncode is not None:
            return
        inside = [pid for pid in self.cgroup.pids() if pid != self.pid]
        for pid in inside:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the event loop: no grace
            loop = None
        if not inside or loop is None:  # still in its gate or bwrap's set-up
            self._kill_outer()
        elif self._escalation is None:
            self._escalation = loop.call_later(KILL_GRACE_S, self._kill_outer)

    def _kill_outer(self) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def usage(self) -> Usage:
        try:
            return Usage(self.cgroup.memory_bytes(), self.cgroup.cpu_seconds())
        except OSError:  # the sandbox ended and its cgroup went while it was read
            return Usage()


async def _drain(
    stream: asyncio.StreamReader | None, session: str, name: str, level: int
) -> None:
    """Logs the start of a sandbox's output and drops the rest: it never writes into the
    executor's own stdout or log file, and printing gigabytes only costs it CPU."""
    if stream is None:
        return
    budget = OUTPUT_LOG_LIMIT
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return
        if budget > 0:
            text = chunk[:budget].decode(errors="replace").rstrip()
            if text:
                log.log(level, "sandbox %s %s: %s", session, name, text)
            budget -= len(chunk)
            if budget <= 0:
                log.warning("sandbox %s %s: more output dropped", session, name)


@dataclass(kw_only=True, eq=False)
class GatedDriver:
    """What the bwrap and gvisor drivers share: the limits each sandbox gets, the cgroup
    hierarchy its cgroup goes in, and each interpreter's layout, probed once. A subclass checks
    its host in __post_init__ and starts each sandbox through start_gated."""

    name: ClassVar[str]
    scratch_mb: int = 64
    pids_max: int = 128
    nofile: int = 1024
    cpus: float = 1.0
    # Where the sandboxes' cgroups go; None: the host's (detected once the binary is found).
    hierarchy: Hierarchy | None = None
    cgroups: Hierarchy = field(init=False)
    # The interpreter sandboxes run unless a spec names one: the agents' runtime (runtime.py).
    python: str = ""
    _layouts: dict[str, Layout] = field(default_factory=dict, init=False, repr=False)

    @staticmethod
    def _installed(binary: str, hint: str) -> str:
        """The path of `binary`; SandboxUnavailable saying `hint` when it is not installed."""
        found = shutil.which(binary)
        if found is None:
            raise SandboxUnavailable(hint)
        return found

    def _writable_cgroups(self, fix: str) -> Hierarchy:
        """The hierarchy sandboxes' cgroups go in, if the executor can write it; else
        SandboxUnavailable saying `fix`."""
        cgroups = self.hierarchy or detect()
        unwritable = [str(d) for d in cgroups.directories() if not os.access(d, os.W_OK)]
        if unwritable:
            raise SandboxUnavailable(
                f"the {self.name} driver puts each sandbox in a cgroup, but cannot write "
                f"{unwritable}: {fix}"
            )
        return cgroups

    def _runtime(self) -> str:
        """The agents' runtime's interpreter; SandboxUnavailable saying how to install it."""
        if self.python:
            return self.python
        found = runtime.installed()
        if found is None:
            raise RuntimeMissing(
                f"the {self.name} driver runs agents with the agents' runtime, which is not "
                f"installed under {runtime.ROOT}: run `make` (or, as root, "
                "`.venv/bin/python scripts/setup_runtime.py`)"
            )
        return str(found)

    async def layout(self, python: str) -> Layout:
        """Asks the interpreter itself where it lives (once per interpreter)."""
        layout = self._layouts.get(python)
        if layout is None:
            layout = await probe_layout(python)
            await self._prepare(layout)
            self._layouts[python] = layout
        return layout

    async def _prepare(self, layout: Layout) -> None:
        """Readies the host for sandboxes of a newly probed interpreter; nothing by default."""


@dataclass(kw_only=True, eq=False)
class BwrapDriver(GatedDriver):
    name = "bwrap"
    binary: str = "bwrap"
    # Started by root, bwrap's user namespace would map the sandbox's uid to host uid 0 (without
    # capabilities, but still the owner of root's files). So root's bwrap makes no user
    # namespace: the sandbox starts as root with only CAP_SETUID, CAP_SETGID and CAP_SETPCAP,
    # under the seccomp filter already, and setpriv drops it to host uid/gid NOBODY, no
    # supplementary groups, an empty bounding set and no_new_privs before it execs the worker.
    # Not root, bwrap's user namespace maps NOBODY to the executor's own unprivileged uid.
    as_root: bool = field(default_factory=lambda: os.geteuid() == 0)
    setpriv: str = field(default="setpriv", init=False)

    def __post_init__(self) -> None:
        self.binary = self._installed(
            self.binary,
            "the bwrap sandbox driver needs bubblewrap: run scripts/setup-sandbox.sh as root "
            "(Debian/Ubuntu: apt-get install bubblewrap)",
        )
        version = bwrap_version(self.binary)
        if version < MIN_VERSION:
            raise SandboxUnavailable(
                f"bubblewrap {'.'.join(map(str, version))} is too old: the sandbox's size-limited "
                "scratch disk needs 0.8 or newer (Debian 12's bubblewrap package)"
            )
        self.cgroups = self._writable_cgroups(
            "run the executor as root, or in a cgroup delegated to its user"
        )
        self.python = self._runtime()
        seccomp.filter_bpf()  # fail now, not at the first session, if pyseccomp is missing
        if self.as_root:
            self.setpriv = self._installed(
                "setpriv", "the bwrap driver, run as root, drops each sandbox to host uid "
                f"{NOBODY} with setpriv: install util-linux (Debian: apt-get install util-linux)",
            )
            if not self.setpriv.startswith(("/usr/", "/bin/")):
                raise SandboxUnavailable(f"setpriv at {self.setpriv} is not under /usr: a sandbox "
                                         "would not see it")

    def arguments(self, spec: SandboxSpec, layout: Layout, seccomp_fd: int) -> list[str]:
        """bwrap's options, before the `--` and the command."""
        if self.as_root:
            # No user namespace (see as_root); the seccomp filter refuses to make one inside.
            args = [
                "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                "--unshare-cgroup", "--cap-drop", "ALL",
                "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP",
            ]
        else:
            args = [
                "--unshare-all", "--unshare-user", "--disable-userns",
                "--uid", str(NOBODY), "--gid", str(NOBODY), "--cap-drop", "ALL",
            ]
        args += [
            "--die-with-parent", "--new-session", "--hostname", "corral-sandbox",
            "--ro-bind", "/usr", "/usr",
            # The scratch tmpfs first: an interpreter or virtualenv that lives under /tmp is then
            # bound on top of it instead of being hidden by it.
            # Sticky and world-writable: the sandbox's uid does not own it when bwrap runs as root.
            "--perms", "1777", "--size", str(self.scratch_mb * 1024 * 1024), "--tmpfs", SCRATCH,
        ]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        # The directories on the way to each bind, which bwrap would make 0700 (root's, so
        # closed to the sandbox's uid when bwrap runs as root).
        made: set[str] = {"/", SCRATCH}
        for path in layout.binds:
            parents = [str(p) for p in reversed(PurePosixPath(path).parents)]
            for parent in parents:
                if parent not in made:
                    made.add(parent)
                    args += ["--perms", "0755", "--dir", parent]
            args += ["--ro-bind", path, path]
        args += [
            "--ro-bind", str(spec.bundle_dir), BUNDLE_MOUNT,
            # Read-only /proc: no global sysctl (kernel.core_pattern...) whatever the uid.
            "--proc", "/proc", "--remount-ro", "/proc",
            "--dev", "/dev", "--remount-ro", "/dev",
            "--remount-ro", "/",
            "--chdir", SCRATCH,
            "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "HOME", SCRATCH,
            "--setenv", "TMPDIR", SCRATCH,
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            "--setenv", "PYTHONUNBUFFERED", "1",
            "--setenv", "LANG", "C.UTF-8",
            "--seccomp", str(seccomp_fd),
        ]
        return args

    def command(self, spec: SandboxSpec, layout: Layout, socket_fd: int) -> list[str]:
        """What runs inside: the worker for the agent's protocol (through setpriv, as root)."""
        drop = [
            self.setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
        ] if self.as_root else []
        return [*drop,
            layout.python, "-m", worker_module(spec.protocol),
            str(socket_fd), BUNDLE_MOUNT, spec.entrypoint, spec.prompt_file,
            json.dumps(spec.resource),
        ]

    def _enter(self, pid: int, *, cgroup: SandboxCgroup) -> None:
        """Puts the gated process under its rlimits and into its cgroup, before it runs bwrap."""
        scratch = self.scratch_mb * 1024 * 1024
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (scratch, scratch))
        resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))
        cgroup.add(pid)

    async def spawn(self, spec: SandboxSpec, socket_fd: int) -> BwrapWorker:
        layout = await self.layout(spec.python or self.python)
        cgroup = await asyncio.to_thread(
            SandboxCgroup.create, self.cgroups, Limits(spec.memory_mb, self.pids_max, self.cpus)
        )
        gate_read, gate_write = os.pipe()
        # http agents serve on 127.0.0.1 inside the sandbox's own network namespace (only lo).
        seccomp_fd = seccomp.filter_fd(allow_inet=spec.protocol == "http")
        try:
            proc = await start_gated(
                ["/bin/sh", "-c", _GATE, "corral-sandbox",
                 self.binary, *self.arguments(spec, layout, seccomp_fd),
                 "--", *self.command(spec, layout, socket_fd)],
                gate_read, gate_write, cgroup, functools.partial(self._enter, cgroup=cgroup),
                stdin=gate_read, pass_fds=(socket_fd, seccomp_fd),
            )
        finally:
            os.close(gate_write)
            os.close(seccomp_fd)
        return BwrapWorker(proc, cgroup, spec)

    def remove_orphans(self) -> int:
        """The cgroups of sandboxes whose executor crashed (their processes died with it:
        bwrap's --die-with-parent), killing anything still in them."""
        return remove_orphans(self.cgroups)


async def start_gated(
    argv: Sequence[str], gate_read: int, gate_write: int, cgroup: SandboxCgroup,
    enter: Callable[[int], None], *, stdin: int, pass_fds: tuple[int, ...],
) -> asyncio.subprocess.Process:
    """Starts `argv`, a gate script that waits for one line on `gate_read`; puts it under its
    limits and into `cgroup` with `enter(pid)` (in a thread: joining a cgroup waits for an RCU
    grace period, about 10 ms here), then opens the gate. Nothing of the executor's environment
    goes along: a sandbox's init keeps the environment it was started with, readable in
    /proc/1/environ. Closes `gate_read`; `gate_write` stays the caller's. On failure nothing is
    left running and the cgroup is removed."""
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, env={"PATH": "/usr/bin:/bin"}, cwd="/",
            stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            pass_fds=pass_fds, start_new_session=True,
        )
        os.close(gate_read)
        gate_read = -1
        await asyncio.to_thread(enter, proc.pid)
        os.write(gate_write, b"go\n")
    except BaseException:
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        await asyncio.to_thread(cgroup.remove)
        raise
    finally:
        if gate_read >= 0:
            os.close(gate_read)
    return proc
