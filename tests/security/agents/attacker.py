"""An agent that attacks its sandbox: payload {"attack": NAME, ...}; each attack reports what
happened as JSON (the errno it met, what it could read) so the test can assert containment.
Attacks that end the process (memory bomb, CPU spin) report nothing."""

import ctypes
import errno
import importlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable

from corral.sdk import App

app = App()
libc = ctypes.CDLL(None, use_errno=True)


def _errno(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))


def _attempt(done: str, act: Callable[..., object], *args: object) -> str:
    """What came of `act(*args)`: `done`, or the errno it met."""
    try:
        act(*args)
    except OSError as exc:
        return _errno(exc)
    return done


def _read(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return {"content": f.read(4096).decode(errors="replace")}
    except OSError as exc:
        return {"error": _errno(exc)}


def read(p: dict) -> dict:
    return {path: _read(path) for path in p["paths"]}


def environ(p: dict) -> dict:
    """Every environment this sandbox can see, and the executor's by its host pid."""
    seen = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            seen[entry] = _read(f"/proc/{entry}/environ")
    return {"visible": seen, "executor": _read(f"/proc/{p['executor_pid']}/environ")}


def processes(p: dict) -> dict:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found[entry] = _read(f"/proc/{entry}/cmdline").get("content", "").replace("\0", " ")
    return {"processes": found}


def _append(path: str) -> None:
    with open(path, "ab") as f:
        f.write(b"pwned\n")


def write(p: dict) -> dict:
    return {path: _attempt("written", _append, path) for path in p["paths"]}


def _connect(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect((host, port))


def _open_socket(family: int, kind: int) -> None:
    socket.socket(family, kind).close()


def connect(p: dict) -> dict:
    out = {
        f"{host}:{port}": _attempt("connected", _connect, host, port)
        for host, port in p["targets"]
    }
    for name, family, kind in (
        ("vsock", getattr(socket, "AF_VSOCK", 40), socket.SOCK_STREAM),
        ("netlink", socket.AF_NETLINK, socket.SOCK_RAW),
        ("packet", getattr(socket, "AF_PACKET", 17), socket.SOCK_RAW),
        ("udp", socket.AF_INET, socket.SOCK_DGRAM),
    ):
        out[name] = _attempt("opened", _open_socket, family, kind)
    return out


def resolve(p: dict) -> dict:
    out = {}
    for name in p["names"]:
        try:
            out[name] = sorted({a[4][0] for a in socket.getaddrinfo(name, 443)})
        except OSError as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def fork_bomb(p: dict) -> dict:
    forked, error = 0, None
    while forked < 100_000:
        try:
            pid = os.fork()
        except OSError as exc:
            error = _errno(exc)
            break
        if pid == 0:  # every child forks for ever too
            while True:
                try:
                    os.fork()
                except OSError:
                    time.sleep(0.01)
        forked += 1
    return {"forked": forked, "error": error}


def memory_bomb(p: dict) -> dict:
    hoard = []
    while True:
        hoard.append(bytes(1 << 20) + b"x")  # a fresh, touched MiB each time


def cpu_spin(p: dict) -> dict:
    for _ in range(p.get("helpers", 0)):
        if os.fork() == 0:
            while True:
                pass
    while True:
        pass


def fill_disk(p: dict) -> dict:
    written, error = 0, None
    chunk = b"\1" * (1 << 20)
    try:
        with open(os.path.join(os.environ.get("TMPDIR", "/tmp"), "fill"), "wb") as f:
            while written < (4 << 30):
                f.write(chunk)
                f.flush()
                written += len(chunk)
    except OSError as exc:
        error = _errno(exc)
    return {"written": written, "error": error}


def shout(p: dict) -> dict:
    block = "A" * (1 << 20) + "\n"
    for _ in range(p["mib"]):
        os.write(1, block.encode())
    return {"printed_mib": p["mib"]}


PTRACE_ATTACH = 16


def ptrace(p: dict) -> dict:
    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    out = {}
    for name, pid in (("child", child), ("init", 1), ("neighbour", p["neighbour_pid"]),
                      ("executor", p["executor_pid"])):
        rc = libc.ptrace(PTRACE_ATTACH, pid, None, None)
        out[f"ptrace {name}"] = "attached" if rc == 0 else errno.errorcode[ctypes.get_errno()]
    for name, pid in (("neighbour", p["neighbour_pid"]), ("executor", p["executor_pid"])):
        out[f"kill {name}"] = _attempt("sent", os.kill, pid, 9)
    os.kill(child, 9)
    os.waitpid(child, 0)
    return out


CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000


def mount(p: dict) -> dict:
    os.makedirs("/tmp/m", exist_ok=True)
    out = {}
    rc = libc.mount(b"none", b"/tmp/m", b"tmpfs", 0, None)
    out["mount(2)"] = "mounted" if rc == 0 else errno.errorcode[ctypes.get_errno()]
    rc = libc.unshare(CLONE_NEWUSER | CLONE_NEWNS)
    out["unshare(2)"] = "unshared" if rc == 0 else errno.errorcode[ctypes.get_errno()]
    run = subprocess.run(["/usr/bin/mount", "-t", "tmpfs", "none", "/tmp/m"],
                         capture_output=True, text=True, check=False)
    out["mount(8)"] = {"returncode": run.returncode, "stderr": run.stderr.strip()}
    out["mounted"] = os.path.ismount("/tmp/m")
    return out


PR_GET_NO_NEW_PRIVS = 39


def setuid(p: dict) -> dict:
    """Runs setuid-root programs; each is asked to show the uid it ends up with."""
    out = {}
    for argv in (["/usr/bin/su", "root", "-c", "id -u > /tmp/su-ran"],
                 ["/usr/bin/newgrp", "root"],
                 ["/usr/bin/passwd", "-S", "root"]):
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(0.05)
        status = _read(f"/proc/{proc.pid}/status").get("content", "")
        uids = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith("Uid:")), [])
        try:
            _, stderr = proc.communicate("\n", timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        out[argv[0]] = {"uids": uids, "returncode": proc.returncode, "stderr": stderr.strip()[:200]}
    out["su_ran"] = os.path.exists("/tmp/su-ran")
    # prctl rather than /proc/self/status: gVisor's status file has no NoNewPrivs line.
    out["no_new_privs"] = str(libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0))
    return out


def outlive(p: dict) -> dict:
    """Leaves a daemon behind: double fork, new session, ignore SIGHUP/SIGTERM, loop."""
    import signal

    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.write(w, str(os.getpid()).encode())
            while True:
                time.sleep(0.05)
        os._exit(0)
    daemon = int(os.read(r, 32))
    return {"daemon": daemon}


def _write_back(path: str) -> None:
    with open(path) as f:
        value = f.read()
    with open(path, "w") as f:
        f.write(value)


def sysctl(p: dict) -> dict:
    """Writes the current value back into global sysctls: harmless if it works; it must not."""
    paths = ("/proc/sys/kernel/core_uses_pid", "/proc/sys/vm/overcommit_memory")
    return {path: _attempt("written", _write_back, path) for path in paths}


def paths(p: dict) -> dict:
    """Every path visible from in here, walking / without following symlinks: not below the
    trees in `prune` (listed themselves), at most `depth` levels down and `limit` entries."""
    prune, depth, limit = set(p["prune"]), p["depth"], p["limit"]
    found: list[str] = []
    truncated = False

    def walk(path: str, level: int) -> None:
        nonlocal truncated
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if len(found) >= limit:
                truncated = True
                return
            found.append(entry.path)
            if (entry.path not in prune and level < depth
                    and entry.is_dir(follow_symlinks=False)):
                walk(entry.path, level + 1)

    walk("/", 1)
    return {"paths": found, "truncated": truncated}


def imports(p: dict) -> dict:
    """Which of the modules named can be imported in here."""
    found = {}
    for name in p["modules"]:
        try:
            importlib.import_module(name)
            found[name] = "imported"
        except ImportError as exc:
            found[name] = type(exc).__name__
    return found


def whoami(p: dict) -> dict:
    """The worker's ids and capabilities, as its kernel reports them."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    return {"uid": os.getresuid(), "gid": os.getresgid(), "groups": os.getgroups(),
            "caps": {k: status[k].strip() for k in ("CapPrm", "CapEff", "CapBnd", "CapAmb")
                     if k in status},
            "pid": os.getpid()}


ATTACKS = {f.__name__: f for f in (read, environ, processes, write, connect, resolve, fork_bomb,
                                    memory_bomb, cpu_spin, fill_disk, shout, ptrace, mount, setuid,
                                    outlive, sysctl, paths, imports, whoami)}


@app.entrypoint
def handle(payload, ctx):
    yield json.dumps(ATTACKS[payload["attack"]](payload))
