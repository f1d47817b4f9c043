"""The seccomp filter per agent protocol: corral sandboxes create Unix sockets only; http sandboxes
(an AgentCore-contract server on the sandbox's own loopback) also inet and inet6, and still no
netlink, packet or vsock sockets. Each filter is loaded into a child process exactly as compiled
for bwrap, and the child reports what socket(2) and socketpair(2) answer."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.executor.drivers import seccomp
from services.executor.drivers.base import SandboxSpec, worker_module

try:
    seccomp.filter_bpf()
    _SECCOMP = ""
except seccomp.SeccompUnavailable as exc:
    _SECCOMP = str(exc)

needs_seccomp = pytest.mark.skipif(bool(_SECCOMP), reason=_SECCOMP or "-")
AF_VSOCK = 40

# Loads the BPF at argv[1] (no_new_privs, then PR_SET_SECCOMP) and tries each socket family.
_CHILD = """
import ctypes, errno, json, socket, sys

bpf = open(sys.argv[1], "rb").read()
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
buf = ctypes.create_string_buffer(bpf, len(bpf))
prog = Prog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
libc = ctypes.CDLL(None, use_errno=True)
ulong = ctypes.c_ulong
assert libc.prctl(38, ulong(1), ulong(0), ulong(0), ulong(0)) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, ulong(2), ctypes.byref(prog), ulong(0), ulong(0)) == 0, ctypes.get_errno()

def attempt(make):
    try:
        for s in make():
            s.close()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

tried = {}
for family in json.loads(sys.argv[2]):
    tried[f"socket {family}"] = attempt(lambda: [socket.socket(family, socket.SOCK_STREAM)])
for family in (socket.AF_UNIX, socket.AF_INET):
    tried[f"socketpair {family}"] = attempt(lambda: socket.socketpair(family))
print(json.dumps(tried))
"""

FAMILIES = [socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK, AF_VSOCK, 3, 9, 11]


def _under_filter(bpf: bytes, tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "filter.bpf"
    path.write_bytes(bpf)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), json.dumps(FAMILIES)],
        capture_output=True, text=True, timeout=30, check=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@needs_seccomp
def test_corral_sandboxes_create_unix_sockets_only(tmp_path: Path) -> None:
    tried = _under_filter(seccomp.filter_bpf(), tmp_path)
    assert tried.pop(f"socket {socket.AF_UNIX}") == "ok"
    assert tried.pop(f"socketpair {socket.AF_UNIX}") == "ok"
    assert set(tried.values()) == {"EPERM"}, tried


@needs_seccomp
def test_http_sandboxes_also_create_inet_sockets_and_nothing_else(tmp_path: Path) -> None:
    tried = _under_filter(seccomp.filter_bpf(allow_inet=True), tmp_path)
    for family in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
        assert tried.pop(f"socket {family}") == "ok", family
    assert tried.pop(f"socketpair {socket.AF_UNIX}") == "ok"
    # netlink, vsock, the families between and above, and inet socketpairs stay refused.
    assert set(tried.values()) == {"EPERM"}, tried


@needs_seccomp
def test_the_two_variants_differ_only_for_http() -> None:
    assert seccomp.filter_bpf() == seccomp.filter_bpf(allow_inet=False)
    assert seccomp.filter_bpf(allow_inet=True) != seccomp.filter_bpf()


def _spec(protocol: str, tmp_path: Path) -> SandboxSpec:
    return SandboxSpec(
        session="sessions/s", version="agents/a/versions/1", bundle_dir=tmp_path, workdir=tmp_path,
        entrypoint="app:app", prompt_file="", python=sys.executable, protocol=protocol,
    )


def test_each_protocol_has_its_worker() -> None:
    assert worker_module("corral") == "corral.sdk._runtime"
    assert worker_module("http") == "corral.sdk._http_runtime"
    with pytest.raises(ValueError, match="no sandbox worker for protocol 'grpc'"):
        worker_module("grpc")


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_bwrap_runs_the_bridge_for_http_agents(tmp_path: Path) -> None:
    from services.executor.drivers.bwrap import BwrapDriver, Layout

    layout = Layout(python=sys.executable, binds=())
    driver = BwrapDriver()
    for protocol, module in (("corral", "corral.sdk._runtime"), ("http", "corral.sdk._http_runtime")):
        command = driver.command(_spec(protocol, tmp_path), layout, socket_fd=5)
        if driver.as_root:  # setpriv ... -- first (test_bwrap_arguments.py)
            command = command[command.index("--") + 1:]
        assert command[:3] == [sys.executable, "-m", module]
        assert command[3:6] == ["5", "/bundle", "app:app"]
